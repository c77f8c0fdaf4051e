"""Making story creation safe to repeat: the `Idempotency-Key` protocol.

A request carrying an `Idempotency-Key` first claims the key in the database
(atomic across workers and replicas, scoped by owner). The story is stored and
the key marked done in one transaction, so a repeat gets the first story and no
upstream is called twice. The same key with another body is a 422.

A claim is a short lease (`IDEMPOTENCY_LEASE_SECONDS`) under a random token:
while its request runs, a heartbeat renews the lease every third of it. A claim
whose lease lapsed belongs to a dead worker (or one that could not reach the
database for a whole lease); the next request with the same body takes it over
at once. The story write, the renewals and the release all require the token,
so a request whose claim was taken over stores nothing (409) and frees nothing.

A repeat that arrives while the first request still runs waits for it (up to
`IDEMPOTENCY_WAIT_SECONDS`, within its own deadline), reading the key with
exponential backoff and full jitter, then gets 409 with `Retry-After`. A request
that fails releases its claim, so the phone's retry can run; when the database
is down at that moment, the lease lapses instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from app.db.repository import ClaimLostError, StoryRepository
from app.errors import ConflictError, InvalidRequestError
from app.models import IdempotencyEntry, StoryRecord
from app.platform.background import stop_task
from app.providers.base import StoryRequest

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class IdempotencyPolicy:
    # A claim is a lease this long, renewed every third of it while its request
    # runs; a claim not renewed for this long is taken to belong to a dead worker.
    lease_seconds: float = 5.0
    # Keys are remembered at least this long.
    ttl_seconds: float = 24 * 3600.0
    # How long a repeat waits for the first request before 409.
    wait_seconds: float = 10.0
    # While it waits, a repeat reads the key after a random pause of up to
    # first * 2**n seconds (n = reads so far), at most `poll_max_seconds`.
    poll_first_seconds: float = 0.05
    poll_max_seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.lease_seconds <= 0:
            raise ValueError("lease_seconds must be > 0")
        if not 0 < self.poll_first_seconds <= self.poll_max_seconds:
            raise ValueError("need 0 < poll_first_seconds <= poll_max_seconds")

    @property
    def renew_every_seconds(self) -> float:
        return self.lease_seconds / 3

    def poll_pause(self, reads: int) -> float:
        """Full jitter: uniform in [0, min(max, first * 2**reads)]."""
        ceiling = min(self.poll_max_seconds, self.poll_first_seconds * 2 ** min(reads, 32))
        return random.uniform(0, ceiling)


@dataclass(frozen=True, slots=True)
class CreatedStory:
    story: StoryRecord
    replayed: bool  # True when an earlier request with the same key made it


def request_fingerprint(request: StoryRequest, illustrate: bool) -> str:
    body = {
        "prompt": request.prompt,
        "age": request.age,
        "length": request.length,
        "language": request.language,
        "illustrate": illustrate,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


#: Writes and stores the story under the claim with the given token
#: (`StoryRepository.add(..., claim_token=...)`).
CreateClaimed = Callable[[str], Awaitable[StoryRecord]]


class IdempotencyKeys:
    """Runs a creation at most once per (owner, key)."""

    def __init__(self, repository: StoryRepository, policy: IdempotencyPolicy) -> None:
        self._repository = repository
        self.policy = policy
        # Work that a cancelled request lets finish (a renewal, a release): kept
        # referenced until done.
        self._finishing: set[asyncio.Future[Any]] = set()

    async def create_once(
        self,
        owner: str,
        key: str,
        fingerprint: str,
        *,
        time_left: float,
        create: CreateClaimed,
    ) -> CreatedStory:
        """The story made under `key`: by this call (`create`), or by an earlier one."""
        policy = self.policy
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + min(policy.wait_seconds, time_left)
        token = secrets.token_urlsafe(18)
        entry = await self._claim(owner, key, fingerprint, token)
        reads = 0
        while True:
            if entry is None:
                story = await self._create_claimed(owner, key, token, create)
                return CreatedStory(story, False)
            if entry.fingerprint != fingerprint:
                raise InvalidRequestError(
                    "This Idempotency-Key was used with a different request body.",
                    errors=[
                        {
                            "field": "Idempotency-Key",
                            "reason": "already used with a different request body",
                        }
                    ],
                )
            if entry.state == "done" and entry.story_id is not None:
                first = await self._repository.get(entry.story_id, owner)
                if first is not None:
                    return CreatedStory(first, True)
            left = give_up_at - loop.time()
            if left <= 0:
                raise ConflictError(
                    "A request with this Idempotency-Key is still being processed; "
                    "repeat it shortly to get its result.",
                    headers={"Retry-After": "1"},
                )
            await asyncio.sleep(min(policy.poll_pause(reads), left))
            reads += 1
            # A read while the first request runs; a claim only when the key
            # looks free (released, or its lease lapsed): the claim re-checks.
            entry = await self._repository.read_key(owner, key)
            if entry is None or _lapsed(entry):
                entry = await self._claim(owner, key, fingerprint, token)

    async def _claim(
        self, owner: str, key: str, fingerprint: str, token: str
    ) -> IdempotencyEntry | None:
        now = datetime.now(UTC)
        return await self._repository.claim_key(
            owner,
            key,
            fingerprint,
            token=token,
            now=now,
            locked_until=now + timedelta(seconds=self.policy.lease_seconds),
            expires_at=now + timedelta(seconds=self.policy.ttl_seconds),
        )

    async def _create_claimed(
        self, owner: str, key: str, token: str, create: CreateClaimed
    ) -> StoryRecord:
        heartbeat = asyncio.create_task(
            self._keep_lease(owner, key, token), name=f"idempotency-lease:{key}"
        )
        release = False
        try:
            return await create(token)
        except ClaimLostError:
            # This request's lease lapsed and another took the key over: that
            # one's story is the answer; the repeat will get it.
            raise ConflictError(
                "A newer request with this Idempotency-Key took over; repeat to get its result.",
                headers={"Retry-After": "1"},
            ) from None
        except BaseException:
            release = True  # free the key so the phone's retry can run
            raise
        finally:
            # Shielded: a cancelled request still stops its heartbeat and frees
            # what it holds; its cancellation goes on as soon as that is done,
            # or at once if it is cancelled again meanwhile.
            await self._finish(self._end_claim(heartbeat, owner, key, token, release=release))

    async def _end_claim(
        self, heartbeat: asyncio.Task[None], owner: str, key: str, token: str, *, release: bool
    ) -> None:
        await stop_task(heartbeat)
        if not release:
            return
        try:
            await self._repository.release_key(owner, key, token)
        except Exception as error:
            logger.warning(
                "could not release an idempotency key; its lease lapses instead",
                extra={"error": repr(error), "lease_seconds": self.policy.lease_seconds},
            )

    async def _keep_lease(self, owner: str, key: str, token: str) -> None:
        """The heartbeat: renews the claim every third of the lease until stopped.

        A failed renewal is logged and tried again at the next beat; it never
        fails the request (the story write decides, by the token). Stops by
        itself once the claim is no longer pending under its token.
        """
        lease = self.policy.lease_seconds
        while True:
            await asyncio.sleep(self.policy.renew_every_seconds)
            until = datetime.now(UTC) + timedelta(seconds=lease)
            try:
                # Stopping the heartbeat never interrupts a statement halfway.
                held = await self._finish(
                    self._repository.renew_key(owner, key, token, locked_until=until)
                )
            except Exception as error:
                logger.warning(
                    "could not renew an idempotency claim; trying again",
                    extra={"error": repr(error), "lease_seconds": lease},
                )
                continue
            if not held:
                # Done meanwhile (a renewal racing the story write), or taken over.
                logger.info("idempotency claim no longer pending; its heartbeat stops")
                return

    async def _finish(self, work: Coroutine[Any, Any, T]) -> T:
        """Awaits `work` in a task of its own: cancelling the caller does not stop it."""
        task = asyncio.ensure_future(work)
        self._finishing.add(task)
        task.add_done_callback(self._finished)
        return await asyncio.shield(task)

    def _finished(self, task: asyncio.Future[Any]) -> None:
        self._finishing.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: whoever awaited it has seen it, or has gone


def _lapsed(entry: IdempotencyEntry) -> bool:
    return entry.state == "pending" and entry.locked_until < datetime.now(UTC)
