"""Builds the picture fetcher and the image check, each behind its guard.

Beside `app.providers.registry` (which builds the story providers and the
illustrator): the fetcher gets a breaker and a bulkhead of its own,
`replicate:files` (the output-file host failing, or slow, is not the image
model failing), and shares the image model's retry policy; the image check
shares the text check's guard (breaker `openai:moderation`, the `openai`
bulkhead), since both are the same endpoint.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass, field

from app.core.resilience import Bulkhead, CircuitBreaker, ResilienceObserver
from app.platform.config import Settings
from app.providers.moderation import ResilientModerator
from app.providers.openai import openai_client
from app.providers.pictures import (
    ImageModerator,
    OpenAIImageModerator,
    PictureFetcher,
    PictureSource,
    ResilientImageModerator,
    ResilientPictureFetcher,
)
from app.providers.registry import Upstreams
from app.providers.resilient import (
    Guard,
    ResilientIllustrator,
    UpstreamCallRecorder,
    ignore_call,
)

FILES_BREAKER = "replicate:files"


@dataclass
class PictureParts:
    # None: no image model configured (nothing to fetch).
    fetcher: PictureSource | None
    # None: no OpenAI moderation (no key, or MODERATION_MODE=local).
    moderator: ImageModerator | None
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)


async def build_picture_parts(
    settings: Settings,
    upstreams: Upstreams,
    stack: AsyncExitStack,
    *,
    observer: ResilienceObserver,
    record_call: UpstreamCallRecorder = ignore_call,
) -> PictureParts:
    parts = PictureParts(fetcher=None, moderator=None)
    illustrator = upstreams.illustrator
    if isinstance(illustrator, ResilientIllustrator):
        image_guard = illustrator.guard
        cfg = settings.resilience.breaker(FILES_BREAKER)
        breaker = CircuitBreaker(
            FILES_BREAKER,
            upstreams.breaker_store,
            failure_threshold=int(cfg["failure_threshold"]),
            recovery_timeout=cfg["recovery_timeout"],
            half_open_max_calls=int(cfg["half_open_max_calls"]),
            max_recovery_timeout=cfg["max_recovery_timeout"],
            observer=observer,
        )
        ils = settings.illustrations
        fetcher = PictureFetcher.build(
            timeout_seconds=ils.fetch_timeout_seconds,
            max_bytes=ils.max_bytes,
            max_dimension=ils.max_dimension,
        )
        stack.push_async_callback(fetcher.close)
        guard = Guard(
            provider="replicate",
            operation="files",
            breaker=breaker,
            # Fixed: the drawings of a process are few (ILLUSTRATION_CONCURRENCY).
            bulkhead=Bulkhead(
                FILES_BREAKER, 2 * ils.concurrency, max_wait_seconds=None, observer=observer
            ),
            policy=image_guard.policy,
            record=record_call,
        )
        parts.fetcher = ResilientPictureFetcher(fetcher, guard)
        parts.breakers[FILES_BREAKER] = breaker
    if isinstance(upstreams.moderator, ResilientModerator):
        remote = OpenAIImageModerator(openai_client(settings.openai), settings.moderation.model)
        stack.push_async_callback(remote.close)
        parts.moderator = ResilientImageModerator(remote, upstreams.moderator.guard)
    return parts
