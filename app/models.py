"""Domain records shared by the service and the repositories."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID


@dataclass(frozen=True, slots=True)
class StoredIllustration:
    """The picture of a story: drawn in the background, kept in our object store.

    `status` is `pending` (being drawn, or waiting for a worker), `ready` (checked,
    stored under `key`: served by `GET /v1/stories/{id}/illustration`) or `failed`
    (none will be: `error` says why). The picture's facts were read from its bytes.
    """

    status: str  # "pending" | "ready" | "failed"
    key: str | None = None
    media_type: str | None = None
    size_bytes: int | None = None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    attempts: int = 0
    error: str | None = None

    @property
    def etag(self) -> str | None:
        return f'"{self.sha256}"' if self.sha256 else None


@dataclass(frozen=True, slots=True)
class StoryRecord:
    """A stored story, with what it cost to make (for accounting later)."""

    id: UUID
    owner: str
    title: str
    paragraphs: tuple[str, ...]
    prompt: str
    age: int
    length: str
    language: str
    provider: str
    model: str
    degraded: bool
    # Legacy: the upstream's URL (dead an hour after it was drawn); no longer written.
    illustration_url: str | None
    prompt_tokens: int
    completion_tokens: int
    generation_ms: int
    created_at: datetime
    illustrate: bool = False  # asked for a picture
    # The local word list, not OpenAI's moderation, passed the prompt or the text
    # (None: written before content checks existed).
    moderated_locally: bool | None = None
    # Its picture (None: none asked for).
    illustration: StoredIllustration | None = None


@dataclass(frozen=True, slots=True)
class PageCursor:
    """Position after the last story of a page: newest-first keyset pagination."""

    created_at: datetime
    id: UUID

    def encode(self) -> str:
        raw = f"{self.created_at.isoformat()}|{self.id}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> PageCursor:
        """Raises ValueError for anything that is not a cursor this service made."""
        try:
            padded = token + "=" * (-len(token) % 4)
            created, _, story_id = base64.urlsafe_b64decode(padded).decode().partition("|")
            when = datetime.fromisoformat(created)
            if when.tzinfo is None:
                raise ValueError("cursor time has no zone")
            # Normalised here, so an extreme offset fails now, not in the database.
            when = when.astimezone(UTC)
            return cls(created_at=when, id=UUID(story_id))
        except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError) as error:
            raise ValueError("not a valid cursor") from error


@dataclass(frozen=True, slots=True)
class IdempotencyEntry:
    """What an earlier request with the same Idempotency-Key left behind."""

    fingerprint: str
    state: str  # "pending" while its request runs, "done" once its story is stored
    story_id: UUID | None
    # End of the pending claim's lease: its holder renews it while its request
    # runs; once it has passed, the holder is taken to be dead.
    locked_until: datetime


@dataclass(frozen=True, slots=True)
class StoryPage:
    items: tuple[StoryRecord, ...]
    next_cursor: PageCursor | None
