"""The cloudlet's HTTP API, version 1: what requests carry and how refusals look.

Every refusal is a JSON object `{"error": {"kind", "exit_code", "message", "hint"}}` with an
HTTP status; `kind` and `exit_code` are the vmsynth exit code a client ends with (so the
client's one line and exit code are the same as for the same failure on one machine).
Request bodies are small JSON objects, checked field by field: nothing a client sends is
trusted for its type, size or range.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from typing import Any

from vmsynth.errors import ExitCode, exit_code, is_user_error
from vmsynth.keys import Key
from vmsynth.vm import ram_bytes

VERSION = 1
MAX_BODY = 64 << 10  # a negotiation is a few hundred bytes
MAX_FORWARDS = 16
SESSION_ID = re.compile(r"[0-9a-f]{24}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

# HTTP status for each kind of refusal the cloudlet makes.
STATUS = {ExitCode.USAGE: 400, ExitCode.BASE_MISMATCH: 404, ExitCode.OVER_BUDGET: 413,
          ExitCode.UNSUPPORTED: 422, ExitCode.CORRUPT: 422, ExitCode.BAD_INPUT: 400,
          ExitCode.KEY: 422, ExitCode.DAMAGED_SNAPSHOT: 422, ExitCode.FULL: 503,
          ExitCode.UNAUTHORIZED: 401}


class Refusal(Exception):
    """A request the cloudlet turns down, with the status and body that say why."""

    def __init__(self, status: int, code: ExitCode, message: str, hint: str | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.hint, self.extra = status, code, hint, extra

    def body(self) -> dict[str, Any]:
        return {"error": {"kind": self.code.name.lower(), "exit_code": int(self.code),
                          "message": str(self), "hint": self.hint} | self.extra}

    @classmethod
    def of(cls, err: BaseException) -> Refusal:
        """The refusal for an error synthesis or the VM raised (a bug is a 500)."""
        if isinstance(err, Refusal):
            return err
        if not is_user_error(err):
            return cls(500, ExitCode.ERROR, f"internal error: {type(err).__name__}",
                       "the cloudlet's log has the details")
        code = exit_code(err)
        return cls(STATUS.get(code, 500), code, str(err), getattr(err, "hint", None))


def bad_request(message: str) -> Refusal:
    return Refusal(400, ExitCode.USAGE, message)


def parse_json(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_BODY:
        raise Refusal(413, ExitCode.USAGE, f"request body over {MAX_BODY} bytes")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("request body is not JSON") from None
    if not isinstance(value, dict):
        raise bad_request("request body is not a JSON object")
    return value


def _get(obj: dict[str, Any], name: str, kind: type, where: str, required: bool = True
         ) -> Any:
    value = obj.get(name)
    if value is None and not required:
        return None
    if type(value) is not kind:
        raise bad_request(f"{where}{name} must be a {kind.__name__}")
    if isinstance(value, str) and len(value) > 256:
        raise bad_request(f"{where}{name} is too long")
    return value


@dataclass(frozen=True)
class WantedBase:
    """The base an overlay needs, as its header states it."""

    name: str
    version: str
    digest: str
    virtual_size: int
    memory_digest: str | None = None  # with a memory stream: the base snapshot's

    @classmethod
    def parse(cls, raw: object) -> WantedBase:
        if not isinstance(raw, dict):
            raise bad_request("base must be an object")
        digest = _get(raw, "digest", str, "base.")
        size = _get(raw, "virtual_size", int, "base.")
        memory = raw.get("memory")
        mem_digest = None
        if memory is not None:
            if not isinstance(memory, dict):
                raise bad_request("base.memory must be an object")
            mem_digest = _get(memory, "digest", str, "base.memory.")
        for d in (digest, mem_digest):
            if d is not None and not _DIGEST.fullmatch(d):
                raise bad_request("a digest must be sha256: and 64 lowercase hex digits")
        if not 0 < size <= 1 << 48:
            raise bad_request("base.virtual_size is out of range")
        return cls(_get(raw, "name", str, "base."), _get(raw, "version", str, "base."),
                   digest, size, mem_digest)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Negotiation:
    """A client's request for a session (seed step 2): before any overlay byte is sent."""

    base: WantedBase
    overlay_size: int
    memory: int | None = None  # guest RAM for a boot, bytes
    cpus: int | None = None
    forwards: tuple[int, ...] = ()  # guest TCP ports to forward
    key: Key | None = None  # an encrypted overlay's key (over TLS or loopback only)
    fields_seen: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Negotiation:
        size = _get(body, "overlay_size", int, "")
        if size <= 0:
            raise bad_request("overlay_size must be positive")
        resources = body.get("resources") or {}
        if not isinstance(resources, dict):
            raise bad_request("resources must be an object")
        memory = _get(resources, "memory", str, "resources.", required=False)
        try:
            ram = ram_bytes(memory) if memory is not None else None
        except Exception as err:  # noqa: BLE001 (a UsageError with the reason)
            raise bad_request(str(err)) from None
        cpus = _get(resources, "cpus", int, "resources.", required=False)
        if cpus is not None and not 1 <= cpus <= 64:
            raise bad_request("resources.cpus must be 1 to 64")
        forwards = body.get("forward") or []
        if not isinstance(forwards, list) or len(forwards) > MAX_FORWARDS or \
                not all(type(p) is int and 1 <= p <= 65535 for p in forwards):
            raise bad_request(f"forward must be a list of up to {MAX_FORWARDS} TCP ports")
        return cls(WantedBase.parse(body.get("base")), size, ram, cpus,
                   tuple(dict.fromkeys(forwards)), _key(body.get("key")),
                   frozenset(body))


def _key(raw: object) -> Key | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise bad_request("key must be an object")
    if "key_file" in raw:
        try:
            data = base64.b64decode(_get(raw, "key_file", str, "key."), validate=True)
        except ValueError:
            raise bad_request("key.key_file must be base64") from None
        if len(data) != 32:
            raise bad_request("key.key_file must hold 32 bytes")
        return Key(key_file=data)
    passphrase = _get(raw, "passphrase", str, "key.")
    return Key(passphrase=passphrase)
