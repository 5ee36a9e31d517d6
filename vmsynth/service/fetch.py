"""A cloudlet that lacks the base a client asks for fetches it from its registry.

`vmsynth serve --registry oci://HOST/REPO`: a negotiation for a base the cloudlet does not
have, but the repository publishes, is answered 202 ("fetching", with a Retry-After)
instead of a refusal, and the base is installed in the background as `vmsynth base pull`
does (by delta from a base held here when the registry has one, identity checked). The
client asks again; once the base is in the cache it gets its session.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from vmsynth.errors import ExitCode, RegistryNotFoundError, VmsynthError
from vmsynth.registry import Access, Reference
from vmsynth.registry_bases import fetch_identity

from .api import Refusal, WantedBase

log = logging.getLogger("vmsynth.service")

RETRY_AFTER = 3  # seconds a client waits before it asks again
FORGET = 300.0  # a failed fetch is tried again after this long
AT_ONCE = 2  # fetches in flight: clients asking for many bases cannot flood the registry


@dataclass
class _Job:
    task: asyncio.Task[None] | None = None
    done: bool = False
    error: str | None = None
    missing: bool = False  # the registry does not publish it
    ended: float = field(default_factory=time.monotonic)


class Fetcher:
    def __init__(self, reference: str, access: Access,
                 reload: Callable[[], Awaitable[None]]) -> None:
        self.ref = Reference.parse(reference, need="")
        self.access = access
        self.reload = reload
        self.jobs: dict[tuple[str, int, str | None], _Job] = {}
        self.cancel = threading.Event()

    def ask(self, want: WantedBase) -> None:
        """Called when no cached base serves `want`.

        Raises:
            Refusal: 202 while the base is being fetched; 404 when the registry does not
                publish it or fetching it failed (for FORGET seconds, then it is tried again);
                503 when AT_ONCE other bases are being fetched.
        """
        key = (want.digest, want.virtual_size, want.memory_digest)
        now = time.monotonic()
        self.jobs = {k: j for k, j in self.jobs.items()
                     if k == key or not j.done or now - j.ended <= FORGET}
        job = self.jobs.get(key)
        if job is None or (job.error is not None and now - job.ended > FORGET):
            if sum(not j.done for j in self.jobs.values()) >= AT_ONCE:
                raise Refusal(503, ExitCode.FULL, "the cloudlet is already fetching "
                              f"{AT_ONCE} bases from its registry",
                              "try again after the Retry-After", retry_after=30)
            job = _Job()
            job.task = asyncio.get_running_loop().create_task(self._fetch(job, want))
            self.jobs[key] = job
            log.info("fetching base %s (%s...) from %s", want.label, want.digest[:19], self.ref)
        if job.error is not None:
            raise Refusal(404, ExitCode.BASE_MISMATCH,
                          f"this cloudlet does not have base {want.label} "
                          f"({want.digest[:19]}...), and " + (
                              f"{self.ref} does not publish it" if job.missing else
                              f"fetching it from {self.ref} failed: {job.error}"),
                          "find a cloudlet with that base, or run the overlay elsewhere")
        if not job.done:
            raise Refusal(202, ExitCode.BASE_MISMATCH,
                          f"the cloudlet is fetching base {want.label} from {self.ref}",
                          "ask again after the Retry-After", retry_after=RETRY_AFTER,
                          fetching={"base": want.label, "registry": str(self.ref)})
        # Installed, and still no offer serves it: the caller refuses as usual.

    async def _fetch(self, job: _Job, want: WantedBase) -> None:
        try:
            await asyncio.to_thread(fetch_identity, self.ref, self.access, want.digest,
                                    want.virtual_size, want.memory_digest, self.cancel)
            await self.reload()
            log.info("base %s is installed", want.label)
        except RegistryNotFoundError as err:
            job.error, job.missing = str(err), True
        except VmsynthError as err:
            job.error = str(err)
            log.warning("fetching base %s failed: %s", want.label, err)
        except Exception as err:  # a bug: logged, and the client told
            job.error = f"internal error: {type(err).__name__}"
            log.exception("fetching base %s failed", want.label)
        finally:
            job.done, job.ended = True, time.monotonic()

    async def close(self) -> None:
        """Stop the fetches (a fetch stops at its next read and leaves nothing)."""
        self.cancel.set()
        tasks = [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=60)
