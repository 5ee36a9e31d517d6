"""A small client of the OCI distribution API (registries: CNCF distribution, Harbor, Zot,
GHCR, ECR, ...), enough to publish and fetch vmsynth's artifacts.

Synchronous, on urllib like vmsynth.source's downloads: the CLI is synchronous, the
rebuilders read a `Source` with `.read(n)`, and the cloudlet runs a fetch on a thread.
Blobs are streamed, never held whole: `BlobReader` hashes the bytes as they arrive and
refuses to hand out the last of them unless their SHA-256 is the descriptor's, resumes a
dropped transfer with an HTTP Range request from the byte where it broke, and refuses a
registry that answers such a request with the whole blob (200) instead of the rest (206).

Authorization follows the registry's challenge: Basic with the user's credentials, or the
bearer token flow (`WWW-Authenticate: Bearer realm=...,service=...,scope=...`, a token
asked from the realm, the request repeated with it). Credentials come from
--registry-token-file or the user's Docker configuration (`docker login` / `oras login`);
they only ever travel in headers, and no message shows one.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .errors import (
    DigestMismatchError,
    RegistryAuthError,
    RegistryError,
    RegistryNotFoundError,
    UsageError,
)
from .source import Limits, Pace, redact

SCHEME = "oci://"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
MAX_MANIFEST = 4 << 20  # what registries accept for a manifest
MAX_SMALL = 1 << 20  # a token answer, an error body, a tag list page
CHUNK = 1 << 20
RESUMES = 5  # attempts in a row that bring no new byte before a transfer is given up
USER_AGENT = "vmsynth"

_REPO = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)"
                   r"[a-z0-9]+)*)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HOST = re.compile(r"[A-Za-z0-9.-]+(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?")


def is_reference(spec: str) -> bool:
    return spec.startswith(SCHEME)


@dataclass(frozen=True)
class Reference:
    """`oci://HOST[:PORT]/REPOSITORY[:TAG][@sha256:DIGEST]`."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, spec: str, need: str = "tag or digest") -> Reference:
        """Parse a reference; `need` is "tag or digest" (a manifest), "tag" (a push),
        "repository or tag" (a push that can choose the tag) or "" (a repository: no tag or
        digest allowed).

        Raises:
            UsageError: not a well-formed reference, or without what `need` asks.
        """
        shown = redact(spec)
        if not spec.startswith(SCHEME):
            raise UsageError(f"{shown}: not a registry reference",
                             hint="write oci://HOST/REPOSITORY:TAG")
        rest = spec[len(SCHEME):]
        host, slash, path = rest.partition("/")
        if "@" in host:
            raise UsageError(f"{shown}: no credentials in a registry reference",
                             hint="log in with `docker login HOST` (or `oras login`), or "
                                  "give --registry-token-file")
        if not slash or not _HOST.fullmatch(host):
            raise UsageError(f"{shown}: no registry host and repository",
                             hint="write oci://HOST/REPOSITORY:TAG")
        path, _, digest = path.partition("@")
        repo, tag = path, None
        last = path.rfind("/")
        if ":" in path[last + 1:]:
            repo, _, tag = path.rpartition(":")
        if not _REPO.fullmatch(repo) or len(repo) > 255:
            raise UsageError(f"{shown}: {repo!r} is not a repository name",
                             hint="lowercase letters, digits and . _ - separated by /")
        if tag is not None and not _TAG.fullmatch(tag):
            raise UsageError(f"{shown}: {tag!r} is not a tag",
                             hint="up to 128 letters, digits and _ . - (not first)")
        if digest and not DIGEST.fullmatch(digest):
            raise UsageError(f"{shown}: {digest!r} is not a sha256 digest",
                             hint="write @sha256: and 64 lowercase hex digits")
        ref = cls(host, repo, tag, digest or None)
        if need == "" and (ref.tag or ref.digest):
            raise UsageError(f"{shown}: give a repository, without a tag or digest",
                             hint="write oci://HOST/REPOSITORY")
        if need == "tag" and not ref.tag:
            raise UsageError(f"{shown}: give a tag to push to",
                             hint="write oci://HOST/REPOSITORY:TAG")
        if need == "repository or tag" and ref.digest:
            raise UsageError(f"{shown}: give a repository or a tag to push to, not a digest",
                             hint="write oci://HOST/REPOSITORY[:TAG]")
        if need == "tag or digest" and not (ref.tag or ref.digest):
            raise UsageError(f"{shown}: give a tag or a digest",
                             hint="write oci://HOST/REPOSITORY:TAG or ...@sha256:...")
        return ref

    @property
    def reference(self) -> str:
        """What the manifest is fetched by: the digest when given, else the tag."""
        return self.digest or self.tag or ""

    def with_tag(self, tag: str | None) -> Reference:
        return Reference(self.host, self.repository, tag, None)

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.host, self.repository, self.tag, digest)

    def __str__(self) -> str:
        return SCHEME + self.host + "/" + self.repository + \
            (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def tag_for(text: str) -> str:
    """A tag for a name that may hold characters tags cannot (a version with +)."""
    tag = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:128]
    return tag if _TAG.fullmatch(tag) else "_" + tag[:127]


# -- credentials ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Access:
    """How to reach registries: TLS or not, and where credentials come from."""

    plain_http: bool = False  # http:// instead of https:// (a registry without TLS)
    token_file: Path | None = None  # USER:SECRET (Basic / token flow) or a bare bearer token
    docker_config: Path | None = None  # default: $DOCKER_CONFIG/config.json, ~/.docker/...
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class Credentials:
    user: str | None = None
    secret: str | None = None
    bearer: str | None = None  # a token sent as is

    def basic(self) -> str | None:
        if self.user is None or self.secret is None:
            return None
        return "Basic " + base64.b64encode(f"{self.user}:{self.secret}".encode()).decode()


def _docker_config(access: Access) -> Path:
    if access.docker_config is not None:
        return access.docker_config
    folder = os.environ.get("DOCKER_CONFIG")
    return Path(folder) / "config.json" if folder else Path.home() / ".docker" / "config.json"


def _host_of(key: str) -> str:
    """`https://host:port/v1/` (as some tools write it) to `host:port`."""
    if "://" in key:
        key = key.partition("://")[2]
    return key.partition("/")[0]


def credentials(host: str, access: Access) -> Credentials | None:
    """The user's credentials for `host`: --registry-token-file, else the Docker
    configuration (an `auths` entry, else a credential helper).

    Raises:
        UsageError: the token file cannot be read.
        RegistryAuthError: the Docker configuration or its helper is broken.
    """
    if access.token_file is not None:
        try:
            text = access.token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            why = err.strerror if isinstance(err, OSError) else "not text"
            raise UsageError(f"--registry-token-file {access.token_file}: {why}") from None
        if not text:
            raise UsageError(f"--registry-token-file {access.token_file} is empty")
        user, sep, secret = text.partition(":")
        return Credentials(user, secret) if sep else Credentials(bearer=text)
    path = _docker_config(access)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise RegistryAuthError(f"{path}: cannot read the Docker configuration ({err})",
                                hint="fix it, or log in again with `docker login`") from None
    if not isinstance(config, dict):
        return None
    auths = config.get("auths")
    # Docker Hub's registry is registry-1.docker.io; `docker login` files it as index.docker.io.
    names = {host, "index.docker.io"} if host in ("registry-1.docker.io", "docker.io") \
        else {host}
    for key, entry in (auths.items() if isinstance(auths, dict) else ()):
        if _host_of(key) not in names or not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, sep, secret = base64.b64decode(entry["auth"]).decode().partition(":")
            except ValueError:
                sep = ""
            if not sep:
                raise RegistryAuthError(f"{path}: the credentials for {host} are malformed",
                                        hint=f"log in again: `docker login {host}`")
            return Credentials(user, secret)
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], entry["password"])
    helpers = config.get("credHelpers")
    helper = helpers.get(host) if isinstance(helpers, dict) else None
    helper = helper or config.get("credsStore")
    if isinstance(helper, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", helper):
        return _from_helper(helper, host, path)
    return None


def _from_helper(helper: str, host: str, config: Path) -> Credentials | None:
    """Ask a Docker credential helper (`docker-credential-NAME get`)."""
    program = shutil.which(f"docker-credential-{helper}")
    if program is None:
        raise RegistryAuthError(f"{config} names the credential helper {helper!r}, which is "
                                "not installed", hint=f"install docker-credential-{helper}")
    try:
        proc = subprocess.run([program, "get"], input=host, capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RegistryAuthError(f"the credential helper {helper} failed ({err})") from None
    if proc.returncode != 0:
        return None  # the helper has nothing for this host
    try:
        answer = json.loads(proc.stdout)
        user, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError):
        raise RegistryAuthError(f"the credential helper {helper} answered something that is "
                                "not credentials") from None
    if not isinstance(user, str) or not isinstance(secret, str):
        raise RegistryAuthError(f"the credential helper {helper} answered malformed "
                                "credentials")
    return Credentials(user, secret)


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="...",scope="..."` to ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'([A-Za-z_]+)="([^"]*)"', rest)}
    return scheme.lower(), params


# -- the client ----------------------------------------------------------------------------

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Uploads answer 201/202 with a Location that is not a redirect to follow."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        if req.get_method() not in ("GET", "HEAD"):
            return None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_NoRedirect)


@dataclass
class Response:
    status: int
    headers: Any
    body: Any  # the open response (read it, then close it)

    def read_small(self, limit: int = MAX_SMALL) -> bytes:
        data = self.body.read(limit + 1)
        if len(data) > limit:
            raise RegistryError("the registry answered with more data than expected "
                                f"(over {limit:,} bytes)")
        return data

    def close(self) -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            self.body.close()


class Client:
    """One registry host, its authorization, and counters of what crossed the network."""

    def __init__(self, host: str, access: Access = Access(),
                 cancel: threading.Event | None = None) -> None:
        self.host = host
        self.access = access
        self.base = ("http://" if access.plain_http else "https://") + host
        self.cancel = cancel
        self._creds: Credentials | None | bool = False  # False: not looked up yet
        self._auth: dict[str, str] = {}  # repository -> Authorization header that worked
        self.received = 0  # bytes of response bodies read
        self.sent = 0  # bytes of blob and manifest bodies uploaded

    def name(self, repository: str = "") -> str:
        return f"{SCHEME}{self.host}/{repository}".rstrip("/")

    def _credentials(self) -> Credentials | None:
        if self._creds is False:
            self._creds = credentials(self.host, self.access)
        return self._creds  # type: ignore[return-value]

    # -- requests ---------------------------------------------------------------------------

    def request(self, method: str, path: str, repository: str = "",
                headers: dict[str, str] | None = None, data: Any = None,
                ok: tuple[int, ...] = (200,), missing_ok: bool = False,
                timeout: float | None = None, what: str | None = None) -> Response | None:
        """A request to the registry, authorized as its challenge asks.

        `path` is relative to the host (or an absolute URL on it, as upload Locations are).
        Returns None for a 404 when `missing_ok`. `what` names the object in messages.

        Raises:
            RegistryNotFoundError, RegistryAuthError, RegistryError.
        """
        url = urllib.parse.urljoin(self.base + "/", path)
        sent_auth: str | None = self._auth.get(repository) or self._bearer_header()
        for attempt in range(3):
            response = self._send(method, url, headers or {}, data, sent_auth, timeout)
            if response.status == 401 and attempt < 2 and _rewindable(data):
                www = response.headers.get("WWW-Authenticate", "")
                response.close()
                auth = self._answer_challenge(www, sent_auth)
                if auth is not None:
                    sent_auth = auth
                    _rewind(data)
                    continue
                raise self._unauthorized(repository, sent_auth)
            break
        if sent_auth and 200 <= response.status < 300 and repository:
            self._auth[repository] = sent_auth
        if response.status in ok:
            return response
        try:
            detail = _error_detail(response)
        finally:
            response.close()
        if response.status == 404 and missing_ok:
            return None
        where = what or self.name(repository)
        if response.status == 404:
            raise RegistryNotFoundError(f"{where}: not found in the registry"
                                        + (f" ({detail})" if detail else ""),
                                        hint="check the repository and tag (`oras repo tags` "
                                             "lists the tags)")
        if response.status in (401, 403):
            raise self._unauthorized(repository, sent_auth, detail, what)
        if response.status == 416:
            raise RegistryError(f"{where}: the registry refused a byte range ({detail})",
                                hint="try again")
        raise RegistryError(f"{where}: the registry answered {response.status} to {method}"
                            + (f" ({detail})" if detail else ""),
                            hint="try again later; if it persists, ask the registry's operator")

    def _bearer_header(self) -> str | None:
        creds = self._credentials()
        return f"Bearer {creds.bearer}" if creds and creds.bearer else None

    def _send(self, method: str, url: str, headers: dict[str, str], data: Any,
              auth: str | None, timeout: float | None) -> Response:
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("User-Agent", USER_AGENT)
        for k, v in headers.items():
            request.add_header(k, v)
        if auth:
            request.add_unredirected_header("Authorization", auth)  # never to a redirect
        try:
            raw = _OPENER.open(request, timeout=timeout or self.access.limits.speed_time)
            return Response(raw.status, raw.headers, raw)
        except urllib.error.HTTPError as err:
            return Response(err.code, err.headers, err)
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as err:
            unreachable = RegistryError(f"{self.name()}: cannot reach the registry "
                                        f"({_reason(err)})", hint=self._reach_hint(err))
            unreachable.retryable = True  # type: ignore[attr-defined]  (a transfer may resume)
            raise unreachable from None

    def _reach_hint(self, err: BaseException) -> str:
        text = str(err)
        if "WRONG_VERSION_NUMBER" in text or "record layer" in text:
            return "it speaks plain HTTP: add --plain-http"
        if "SSL" in text or "certificate" in text.lower():
            return "a registry signed by a private CA needs SSL_CERT_FILE=CA.pem"
        return "check the address and that the registry runs"

    def _answer_challenge(self, www: str, sent: str | None) -> str | None:
        """The Authorization to retry with, or None when there is nothing better to send."""
        scheme, params = _challenge(www)
        creds = self._credentials()
        if scheme == "basic":
            basic = creds.basic() if creds else None
            return basic if basic and basic != sent else None
        if scheme == "bearer" and params.get("realm"):
            token = self._token(params, creds)
            header = f"Bearer {token}"
            return header if header != sent else None
        return None

    def _token(self, params: dict[str, str], creds: Credentials | None) -> str:
        """The bearer token flow: ask the realm for a token for the challenge's scope."""
        realm = params["realm"]
        query = {k: params[k] for k in ("service", "scope") if params.get(k)}
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        request = urllib.request.Request(url, method="GET")
        request.add_header("User-Agent", USER_AGENT)
        basic = creds.basic() if creds else None
        # A password goes only to a TLS realm, unless the user chose plain HTTP.
        if basic and (realm.startswith("https://") or self.access.plain_http):
            request.add_unredirected_header("Authorization", basic)
        try:
            with _OPENER.open(request, timeout=self.access.limits.speed_time) as answer:
                body = answer.read(MAX_SMALL + 1)
        except urllib.error.HTTPError as err:
            err.close()
            if err.code in (401, 403):
                raise RegistryAuthError(
                    f"{redact(self.base)}: the registry's token service refused "
                    + ("the credentials" if basic else "an anonymous token"),
                    hint=f"log in with `docker login {self.host}` or give "
                         "--registry-token-file") from None
            raise RegistryError(f"{redact(realm)}: the token service answered {err.code}"
                                ) from None
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as err:
            raise RegistryError(f"{redact(realm)}: cannot reach the registry's token service "
                                f"({_reason(err)})") from None
        self.received += len(body)
        try:
            value = json.loads(body)
            token = value.get("token") or value.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{redact(realm)}: the token service answered no token")
        return token

    def _unauthorized(self, repository: str, sent: str | None, detail: str = "",
                      what: str | None = None) -> RegistryAuthError:
        where = what or self.name(repository)
        if sent is None:
            return RegistryAuthError(f"{where}: the registry wants credentials",
                                     hint=f"log in with `docker login {self.host}` (or "
                                          "`oras login`), or give --registry-token-file")
        return RegistryAuthError(f"{where}: the registry refused the credentials"
                                 + (f" ({detail})" if detail else ""),
                                 hint="check them (`docker login` again, or the token file) "
                                      "and that they may read (or push to) this repository")

    # -- manifests --------------------------------------------------------------------------

    def get_manifest(self, ref: Reference, missing_ok: bool = False
                     ) -> tuple[dict[str, Any], bytes, str] | None:
        """The manifest (parsed), its bytes and its digest, checked against the digest asked
        for, or the one the registry states."""
        r = self.request("GET", f"/v2/{ref.repository}/manifests/{ref.reference}",
                         ref.repository, {"Accept": ", ".join(MANIFEST_TYPES)},
                         missing_ok=missing_ok, what=str(ref))
        if r is None:
            return None
        try:
            raw = r.read_small(MAX_MANIFEST)
        except (OSError, http.client.HTTPException) as err:
            raise RegistryError(f"{ref}: the manifest's transfer broke ({_reason(err)})"
                                ) from None
        finally:
            r.close()
        self.received += len(raw)
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        stated = r.headers.get("Docker-Content-Digest")
        if (ref.digest and digest != ref.digest) or (stated and stated != digest):
            raise DigestMismatchError(f"{ref}: the manifest does not match its digest "
                                      f"({digest[:19]}... received)",
                                      hint="the registry or something between is damaging "
                                           "data; try again or ask its operator")
        try:
            manifest = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            manifest = None
        if not isinstance(manifest, dict):
            raise RegistryError(f"{ref}: the registry's manifest is not a JSON object")
        return manifest, raw, digest

    def manifest_digest(self, ref: Reference) -> str | None:
        """The digest a tag points to now (HEAD), or None if there is no such tag."""
        r = self.request("HEAD", f"/v2/{ref.repository}/manifests/{ref.reference}",
                         ref.repository, {"Accept": ", ".join(MANIFEST_TYPES)},
                         missing_ok=True)
        if r is None:
            return None
        r.close()
        stated = r.headers.get("Docker-Content-Digest")
        return stated if stated and DIGEST.fullmatch(stated) else None

    def put_manifest(self, ref: Reference, raw: bytes, media_type: str) -> dict[str, str]:
        """Store a manifest under the reference's tag (or its digest); returns the headers
        that matter (the digest the registry computed, OCI-Subject)."""
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        r = self.request("PUT", f"/v2/{ref.repository}/manifests/{ref.tag or digest}",
                         ref.repository, {"Content-Type": media_type}, raw, ok=(201, 200))
        assert r is not None
        r.close()
        self.sent += len(raw)
        stated = r.headers.get("Docker-Content-Digest")
        if stated and stated != digest:
            raise DigestMismatchError(f"{ref}: the registry stored the manifest under "
                                      f"{stated[:19]}..., not {digest[:19]}...")
        return {"digest": digest, "subject": r.headers.get("OCI-Subject", "")}

    def tags(self, repository: str) -> list[str]:
        """Every tag of a repository (following the registry's pages); none if the
        repository does not exist yet."""
        out: list[str] = []
        path: str | None = f"/v2/{repository}/tags/list?n=1000"
        while path:
            r = self.request("GET", path, repository, missing_ok=True)
            if r is None:
                return out
            try:
                raw = r.read_small()
            finally:
                r.close()
            self.received += len(raw)
            try:
                names = json.loads(raw).get("tags") or []
            except (ValueError, AttributeError):
                raise RegistryError(f"{self.name(repository)}: the tag list is not "
                                    "JSON") from None
            out += [t for t in names if isinstance(t, str)]
            link = re.search(r"<([^>]+)>\s*;\s*rel=\"?next\"?", r.headers.get("Link", ""))
            path = link.group(1) if link else None
        return out

    def referrers(self, repository: str, digest: str,
                  artifact_type: str | None = None) -> list[dict[str, Any]]:
        """The manifests whose subject is `digest`: the referrers API, or where a registry
        lacks it (it answers 404), the `sha256-<hex>` tag that clients keep instead."""
        query = f"?artifactType={urllib.parse.quote(artifact_type)}" if artifact_type else ""
        r = self.request("GET", f"/v2/{repository}/referrers/{digest}{query}", repository,
                         {"Accept": OCI_INDEX}, missing_ok=True)
        if r is not None:
            try:
                raw = r.read_small(MAX_MANIFEST)
            finally:
                r.close()
            self.received += len(raw)
            index = _json_object(raw)
        else:
            found = self.get_manifest(Reference(self.host, repository, fallback_tag(digest)),
                                      missing_ok=True)
            index = found[0] if found else {}
        manifests = index.get("manifests") if isinstance(index, dict) else None
        out = [m for m in manifests or [] if isinstance(m, dict) and
               isinstance(m.get("digest"), str) and DIGEST.fullmatch(m["digest"])]
        if artifact_type:
            out = [m for m in out if m.get("artifactType") == artifact_type]
        return out

    def add_referrer(self, repository: str, subject: str, descriptor: dict[str, Any]) -> None:
        """Add a referrer to the subject's fallback tag (for registries without the
        referrers API): read the index there, add the descriptor, store it back."""
        ref = Reference(self.host, repository, fallback_tag(subject))
        found = self.get_manifest(ref, missing_ok=True)
        index = found[0] if found else {"schemaVersion": 2, "mediaType": OCI_INDEX,
                                         "manifests": []}
        manifests = [m for m in index.get("manifests") or [] if isinstance(m, dict)]
        if any(m.get("digest") == descriptor["digest"] for m in manifests):
            return
        index["manifests"] = manifests + [descriptor]
        self.put_manifest(ref, canonical(index), OCI_INDEX)

    # -- blobs ------------------------------------------------------------------------------

    def has_blob(self, repository: str, digest: str) -> bool:
        r = self.request("HEAD", f"/v2/{repository}/blobs/{digest}", repository,
                         missing_ok=True)
        if r is None:
            return False
        r.close()
        return True

    def push_blob(self, repository: str, digest: str, size: int, open_body: Callable[[], Any],
                  progress: Callable[[int], None] | None = None) -> bool:
        """Upload a blob unless the repository has it already (HEAD first). Returns whether
        bytes were uploaded. `open_body` gives a fresh readable for each attempt.

        One monolithic PUT: the registry checks the digest before it keeps the blob.
        """
        if self.has_blob(repository, digest):
            return False
        r = self.request("POST", f"/v2/{repository}/blobs/uploads/", repository,
                         {"Content-Length": "0"}, b"", ok=(202,))
        assert r is not None
        r.close()
        location = r.headers.get("Location")
        if not location:
            raise RegistryError(f"{self.name(repository)}: the registry started an upload "
                                "without saying where to send it")
        url = location + ("&" if "?" in location else "?") + \
            urllib.parse.urlencode({"digest": digest})
        with open_body() as body:
            counted = _Counted(body, progress)
            r = self.request("PUT", url, repository,
                             {"Content-Type": "application/octet-stream",
                              "Content-Length": str(size)}, counted, ok=(201,),
                             timeout=max(self.access.limits.speed_time, 60.0))
        assert r is not None
        r.close()
        self.sent += counted.count
        stated = r.headers.get("Docker-Content-Digest")
        if stated and stated != digest:
            raise DigestMismatchError(f"{self.name(repository)}: the registry stored the blob "
                                      f"as {stated[:19]}..., not {digest[:19]}...")
        return True

    def open_blob(self, repository: str, descriptor: dict[str, Any]) -> BlobReader:
        return BlobReader(self, repository, descriptor)


class _Counted:
    """A request body that counts (and reports) what was sent."""

    def __init__(self, raw: BinaryIO, progress: Callable[[int], None] | None) -> None:
        self.raw, self.progress, self.count = raw, progress, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n if n and n > 0 else CHUNK)
        self.count += len(data)
        if self.progress and data:
            self.progress(len(data))
        return data


def _rewindable(data: Any) -> bool:
    return data is None or isinstance(data, bytes) or hasattr(getattr(data, "raw", None),
                                                               "seek")


def _rewind(data: Any) -> None:
    """A body sent to a 401 is sent again: start it over."""
    if isinstance(data, _Counted):
        data.raw.seek(0)
        data.count = 0


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _error_detail(response: Response) -> str:
    """The registry's own words for a refusal (its error codes and messages), on one line."""
    try:
        raw = response.body.read(64 << 10)
    except (OSError, http.client.HTTPException):
        return ""
    errors = _json_object(raw).get("errors")
    if isinstance(errors, list):
        words = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
                 for e in errors if isinstance(e, dict)]
        return redact(" ".join("; ".join(words).split()))[:300]
    return ""


def _reason(err: BaseException) -> str:
    from .source import _reason as reason  # one wording for network failures
    return reason(err)


def canonical(value: Any) -> bytes:
    """The one JSON encoding of manifests we write: the same value gives the same digest."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def fallback_tag(digest: str) -> str:
    """The tag where referrers of `digest` are listed on registries without the API."""
    return digest.replace(":", "-")


def file_digest(path: Path, progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    """sha256 and size of a file, read once."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            size += len(chunk)
            if progress:
                progress(len(chunk))
    return "sha256:" + sha.hexdigest(), size


# -- streaming a blob ------------------------------------------------------------------------

class BlobReader:
    """A blob read front to back as it arrives, checked against its descriptor.

    A transfer that breaks is resumed from the byte where it broke with `Range:
    bytes=N-`; the registry must answer 206 with exactly that range. The SHA-256 of all the
    bytes must be the descriptor's before the last of them is returned: a reader never sees
    the end of a blob that is not the one named.
    """

    def __init__(self, client: Client, repository: str, descriptor: dict[str, Any]) -> None:
        digest, size = descriptor.get("digest"), descriptor.get("size")
        if not isinstance(digest, str) or not DIGEST.fullmatch(digest) or \
                type(size) is not int or size < 0:
            raise RegistryError(f"{client.name(repository)}: a descriptor without a valid "
                                "sha256 digest and size")
        self.client, self.repository = client, repository
        self.digest, self.size = digest, size
        self.name = f"{client.name(repository)}@{digest[:19]}..."
        self.received = 0
        self.resumes = 0
        self._sha = hashlib.sha256()
        self._response: Response | None = None
        self._pace = Pace(client.access.limits, self._broken)
        self._open()

    def _url(self) -> str:
        return f"/v2/{self.repository}/blobs/{self.digest}"

    def _open(self) -> None:
        headers = {"Range": f"bytes={self.received}-"} if self.received else {}
        r = self.client.request("GET", self._url(), self.repository, headers,
                                ok=(200, 206))
        assert r is not None
        if self.received and r.status == 200:
            r.close()
            raise RegistryError(
                f"{self.name}: the transfer broke after {self.received:,} bytes and the "
                "registry (or a proxy) answered the request for the rest with the whole blob "
                "(200, not 206): it ignores byte ranges",
                hint="nothing was written; retry on a better link, or without the proxy")
        if r.status == 206:
            match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)",
                                 r.headers.get("Content-Range", "").strip())
            if not match or int(match.group(1)) != self.received or \
                    int(match.group(2)) != self.size - 1 or \
                    match.group(3) not in ("*", str(self.size)):
                r.close()
                raise RegistryError(f"{self.name}: the registry answered another byte range "
                                    f"than the one asked for (bytes {self.received}-)")
        else:
            length = r.headers.get("Content-Length", "")
            if length.isdigit() and int(length) != self.size:
                r.close()
                raise DigestMismatchError(
                    f"{self.name}: the registry's blob is {int(length):,} bytes, its "
                    f"descriptor says {self.size:,} (truncated or replaced)",
                    hint="nothing was written; the registry's copy is damaged: push it again")
        self._response = r

    def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (fewer when that is what the network has); b"" at the end, once
        every byte is there and checked."""
        want = self.size - self.received
        if want <= 0:
            return b""
        want = min(want, n if n and n > 0 else CHUNK)
        failures = 0
        why = "the connection closed early"
        while True:
            if self.client.cancel is not None and self.client.cancel.is_set():
                raise RegistryError(f"{self.name}: the transfer was cancelled")
            began = time.monotonic()
            data = b""
            if self._response is not None:
                try:
                    data = self._response.body.read1(want)
                    if not data:
                        why = "the connection closed early"
                except (OSError, http.client.HTTPException) as err:
                    why = _reason(err)
            self._pace.update(len(data), time.monotonic() - began)
            if data:
                break
            failures += 1
            if failures > RESUMES:
                raise self._broken(f"{why}; {RESUMES} attempts to resume brought nothing")
            if self._response is not None:
                self._response.close()
                self._response = None
            time.sleep(min(0.25 * 2 ** failures, 4.0))
            self.resumes += 1
            try:
                self._open()
            except RegistryError as err:
                if not getattr(err, "retryable", False):
                    raise  # an answer, not a broken link: a byte range ignored, a 404...
                why = str(err)
        self.received += len(data)
        self.client.received += len(data)
        self._sha.update(data)
        if self.received == self.size:
            self._check()
        return data

    def _check(self) -> None:
        got = "sha256:" + self._sha.hexdigest()
        if got != self.digest:
            raise DigestMismatchError(f"{self.name}: the blob does not match its digest "
                                      f"({got[:19]}... received)",
                                      hint="nothing was written; the registry's copy is "
                                           "damaged: push it again")

    def drain(self) -> None:
        """Read the rest (to learn whether the blob matches its digest)."""
        while self.read(CHUNK):
            pass

    def copy_to(self, out: BinaryIO, progress: Callable[[int], None] | None = None) -> None:
        while data := self.read(CHUNK):
            out.write(data)
            if progress:
                progress(len(data))

    def _broken(self, why: str) -> RegistryError:
        return RegistryError(f"{self.name}: the transfer broke off after "
                             f"{self.received:,} of {self.size:,} bytes ({why})",
                             hint="nothing was written; try again")

    def close(self) -> None:
        if self._response is not None:
            self._response.close()


@contextlib.contextmanager
def opened(client: Client, repository: str, descriptor: dict[str, Any]) -> Iterator[BlobReader]:
    reader = client.open_blob(repository, descriptor)
    try:
        yield reader
    finally:
        reader.close()

