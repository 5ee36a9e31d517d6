"""TLS for the cloudlet: the operator's certificate, or a self-signed one made on first start.

A self-signed certificate is trusted by pinning: the service prints the SHA-256 fingerprint
of its certificate (and advertises it), and a client passes it with `--fingerprint`. The key
is made once and kept (mode 0600) so the fingerprint stays the same across restarts.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vmsynth.errors import BadInputError
from vmsynth.store import write_atomic


def fingerprint(cert_pem: bytes) -> str:
    """`sha256:<hex>` of the certificate's DER bytes (what a client pins)."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def self_signed(folder: Path, hosts: list[str]) -> tuple[Path, Path]:
    """The certificate and key in `folder`, made on first use for `hosts` (names or IPs)."""
    cert, key = folder / "tls.crt", folder / "tls.key"
    if cert.exists() and key.exists():
        return cert, key
    folder.mkdir(parents=True, exist_ok=True)
    private = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmsynth cloudlet")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                   .public_key(private.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=3650))
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .sign(private, hashes.SHA256()))
    key_pem = private.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    write_atomic(key, key_pem)
    os.chmod(key, 0o600)
    write_atomic(cert, certificate.public_bytes(serialization.Encoding.PEM))
    return cert, key


def server_context(cert: Path, key: Path) -> tuple[ssl.SSLContext, str]:
    """An SSL context serving `cert`, and its fingerprint."""
    try:
        pem = cert.read_bytes()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
    except (OSError, ValueError, ssl.SSLError) as err:
        raise BadInputError(f"TLS certificate {cert} or key {key}: {err}",
                            hint="give a PEM certificate and its key") from None
    return context, fingerprint(pem)
