"""Overlays as OCI artifacts: push, pull, and read one as it arrives (`oci://` sources).

An overlay is published as an OCI image manifest (schema 2, the 1.1 artifact form):

    artifactType  application/vnd.vmsynth.overlay.v1
    config        the empty descriptor (application/vnd.oci.empty.v1+json, `{}`)
    layers        one: the overlay file, application/vnd.vmsynth.overlay.v1 (formats/SPEC.md)
    annotations   the base it needs (vmsynth.base.name, .version, .digest, .virtual-size,
                  .memory-digest) and the overlay's format version (vmsynth.overlay.format-
                  version), so a registry UI or `oras manifest fetch` shows what it is for

The manifest is written the same way for the same overlay (no timestamp), so pushing an
overlay twice finds its blob (HEAD) and the tag already at its digest: nothing is sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vmsynth.formats import errors as codec
from vmsynth.formats.container import Header, parse_header, read_footer

from .errors import BadInputError, DigestMismatchError, VmsynthError, WrongArtifactError
from .registry import (
    OCI_INDEX,
    OCI_MANIFEST,
    Access,
    BlobReader,
    Client,
    Reference,
    canonical,
    file_digest,
)
from .source import read_error, redact
from .store import atomic_path
from .synth import read_manifest

OVERLAY = "application/vnd.vmsynth.overlay.v1"  # the file (SPEC.md section 12) and its artifact
BASE = "application/vnd.vmsynth.base.v1"
BASE_DELTA = "application/vnd.vmsynth.base.delta.v1"
EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_BLOB = b"{}"
EMPTY_DESCRIPTOR = {"mediaType": EMPTY, "size": 2,
                    "digest": "sha256:" + hashlib.sha256(EMPTY_BLOB).hexdigest()}
TITLE = "org.opencontainers.image.title"
KINDS = {OVERLAY: "a vmsynth overlay", BASE: "a vmsynth base",
         BASE_DELTA: "a vmsynth base delta (an overlay between two versions of a base)"}


def descriptor(media_type: str, digest: str, size: int,
               annotations: dict[str, str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    if annotations:
        out["annotations"] = annotations
    return out


def artifact_manifest(artifact_type: str, config: dict[str, Any], layers: list[dict[str, Any]],
                      annotations: dict[str, str],
                      subject: dict[str, Any] | None = None) -> bytes:
    manifest: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                "artifactType": artifact_type, "config": config,
                                "layers": layers, "annotations": annotations}
    if subject is not None:
        manifest["subject"] = subject
    return canonical(manifest)


def base_annotations(identity: Any, prefix: str = "vmsynth.base.") -> dict[str, str]:
    """An identity (bases.Identity) as annotations."""
    out = {f"{prefix}name": identity.name, f"{prefix}version": identity.version,
           f"{prefix}digest": identity.digest, f"{prefix}virtual-size": str(identity.virtual_size)}
    if identity.memory is not None:
        out[f"{prefix}memory-digest"] = identity.memory.digest
    return out


def kind_of(manifest: dict[str, Any]) -> str:
    """What a manifest holds: its artifact type, else its config's media type (the OCI 1.1
    rule), or "index" for a list of manifests."""
    if manifest.get("mediaType") in (OCI_INDEX,
                                     "application/vnd.docker.distribution.manifest.list.v2+json") \
            or "manifests" in manifest:
        return "index"
    kind = manifest.get("artifactType")
    if isinstance(kind, str) and kind:
        return kind
    config = manifest.get("config")
    kind = config.get("mediaType") if isinstance(config, dict) else None
    if kind == EMPTY:  # an artifact without artifactType: its layer says
        layers = manifest.get("layers")
        first = layers[0] if isinstance(layers, list) and layers else {}
        kind = first.get("mediaType") if isinstance(first, dict) else None
    return kind if isinstance(kind, str) else "unknown"


def expect_kind(ref: Reference | str, manifest: dict[str, Any], want: str) -> None:
    """Refuse a manifest of another kind than `want`, saying what it is instead."""
    kind = kind_of(manifest)
    if kind == want:
        return
    if kind in KINDS:
        what = KINDS[kind]
    elif kind == "index":
        what = "an image index (a list of manifests, e.g. a multi-platform image)"
    elif "image.config" in kind or "container.image" in kind:
        what = f"a container image ({kind})"
    else:
        what = f"an artifact of type {kind}"
    hint = {BASE: "install it with `vmsynth base pull`",
            OVERLAY: "fetch it with `vmsynth pull`"}.get(kind, "check the reference")
    raise WrongArtifactError(f"{redact(str(ref))} is {what}, not {KINDS[want]}", hint=hint)


def single_layer(ref: Reference | str, manifest: dict[str, Any], media_type: str
                 ) -> dict[str, Any]:
    layers = manifest.get("layers")
    found = [d for d in layers if isinstance(d, dict) and d.get("mediaType") == media_type] \
        if isinstance(layers, list) else []
    if len(found) != 1:
        raise WrongArtifactError(f"{redact(str(ref))}: the manifest holds {len(found)} layers "
                                 f"of type {media_type}, not one")
    return found[0]


def check_overlay_file(path: Path) -> Header:
    """The overlay's header, after checking it is complete (header and footer parse)."""
    try:
        with open(path, "rb") as f:
            header = parse_header(f)
            read_footer(f, header.encrypted)
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BadInputError(f"{path}: is a directory, not an overlay") from None
    except OSError as err:
        raise read_error(path, err) from None
    return header


def overlay_annotations(header: Header, title: str) -> dict[str, str]:
    manifest = read_manifest(header.manifest)
    out = base_annotations(manifest.base)
    out["vmsynth.overlay.format-version"] = f"{header.major}.{header.minor}"
    out["vmsynth.overlay.encrypted"] = "true" if header.encrypted else "false"
    if manifest.memory is not None:
        out["vmsynth.overlay.memory"] = "true"
    out[TITLE] = title
    return out


def push_file(client: Client, repository: str, path: Path, media_type: str,
              progress: Callable[[int], None] | None = None,
              digest: tuple[str, int] | None = None) -> tuple[dict[str, Any], bool]:
    """Upload a file as a blob unless the repository has it; its descriptor, and whether
    bytes were sent."""
    digest_, size = digest or file_digest(path)
    uploaded = client.push_blob(repository, digest_, size,
                                lambda: open(path, "rb"), progress)  # noqa: SIM115 (closed there)
    return descriptor(media_type, digest_, size), uploaded


def push_manifest(client: Client, ref: Reference, raw: bytes, media_type: str = OCI_MANIFEST
                  ) -> tuple[str, bool, dict[str, str]]:
    """Store a manifest under the reference's tag unless the tag is at it already; its
    digest, whether it was sent, and what the registry answered."""
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    if ref.tag and client.manifest_digest(ref) == digest:
        return digest, False, {}
    answer = client.put_manifest(ref, raw, media_type)
    return digest, True, answer


def push_empty_config(client: Client, repository: str) -> bool:
    return client.push_blob(repository, EMPTY_DESCRIPTOR["digest"], 2,
                            lambda: io.BytesIO(EMPTY_BLOB))



def push_overlay(path: Path, ref: Reference, access: Access,
                 progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Publish an overlay file under `ref`'s tag; what was sent and the manifest's digest."""
    header = check_overlay_file(path)
    annotations = overlay_annotations(header, path.name)
    client = Client(ref.host, access)
    layer, sent = push_file(client, ref.repository, path, OVERLAY, progress)
    config_sent = push_empty_config(client, ref.repository)
    raw = artifact_manifest(OVERLAY, dict(EMPTY_DESCRIPTOR), [layer], annotations)
    digest, manifest_sent, _ = push_manifest(client, ref, raw)
    return {"reference": str(ref), "digest": digest, "artifact_type": OVERLAY,
            "overlay": {"digest": layer["digest"], "size": layer["size"], "uploaded": sent},
            "manifest_uploaded": manifest_sent, "config_uploaded": config_sent,
            "bytes_sent": client.sent, "annotations": annotations}


def resolve_overlay(client: Client, ref: Reference) -> tuple[dict[str, Any], str,
                                                              dict[str, Any]]:
    """The overlay artifact's manifest, digest and overlay layer descriptor.

    Raises:
        RegistryNotFoundError: no such tag or digest.
        WrongArtifactError: the reference names something else.
    """
    found = client.get_manifest(ref)
    assert found is not None
    manifest, _, digest = found
    expect_kind(ref, manifest, OVERLAY)
    return manifest, digest, single_layer(ref, manifest, OVERLAY)


def pull_overlay(ref: Reference, output: Path, access: Access,
                 progress: Callable[[int], None] | None = None, announce: bool = False
                 ) -> dict[str, Any]:
    """Fetch an overlay into `output` (under a temporary name until its digest matched)."""
    client = Client(ref.host, access)
    manifest, digest, layer = resolve_overlay(client, ref)
    with atomic_path(output, announce=announce) as tmp:
        reader = client.open_blob(ref.repository, layer)
        try:
            with open(tmp, "wb") as f:
                reader.copy_to(f, progress)
                f.flush()
                os.fsync(f.fileno())
        finally:
            reader.close()
    return {"reference": str(ref), "digest": digest, "output": str(output),
            "overlay": {"digest": layer["digest"], "size": layer["size"]},
            "bytes_received": client.received, "resumed": reader.resumes,
            "annotations": manifest.get("annotations") or {}}


class RegistrySource:
    """An overlay read from a registry as it arrives (a vmsynth.source.Source)."""

    def __init__(self, reader: BlobReader, name: str,
                 progress: Callable[[int], None] | None = None) -> None:
        self.reader, self.name, self.size = reader, name, reader.size
        self.progress = progress

    def read(self, n: int = -1) -> bytes:
        data = self.reader.read(n)
        if self.progress is not None and data:
            self.progress(len(data))
        return data


@contextlib.contextmanager
def open_overlay(spec: str, access: Access) -> Iterator[RegistrySource]:
    """An `oci://` overlay to read front to back (apply, verify, run, offload rebuild it as
    it arrives).

    The blob's digest is checked when its last byte arrives, before that byte is handed
    over. If the reader finds the overlay corrupt before that, the rest is fetched to tell
    a damaged registry copy (exit 31) from an overlay that was published damaged (13).
    """
    ref = Reference.parse(spec)
    client = Client(ref.host, access)
    _, _, layer = resolve_overlay(client, ref)
    reader = client.open_blob(ref.repository, layer)
    try:
        yield RegistrySource(reader, str(ref))
    except codec.CorruptError:
        try:
            reader.drain()
        except DigestMismatchError:
            raise  # the registry's copy is damaged: that is the error to report
        except VmsynthError:
            pass  # the rest could not be fetched: the corruption stands as found
        raise
    finally:
        reader.close()
