"""The public JSON shapes of the API (requests validated here, responses rendered here)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.models import StoryRecord
from app.providers.base import StoryRequest
from app.providers.languages import SUPPORTED_LANGUAGES, canonical_tag


class CreateStory(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[
        str,
        Field(min_length=1, max_length=500, description="What the story is about."),
    ]
    age: Annotated[int, Field(ge=2, le=12, strict=True, description="The child's age.")]
    length: Literal["short", "medium", "long"] = "short"
    language: Annotated[str, Field(description="BCP-47 tag, one of the supported ones.")] = "en"
    illustrate: Annotated[bool, Field(strict=True)] = False

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        stripped = value.strip()
        if not stripped:
            raise ValueError("must contain more than white space")
        return stripped

    @field_validator("language")
    @classmethod
    def _supported(cls, value: str) -> str:
        canonical = canonical_tag(value)
        if canonical is None:
            raise ValueError(f"unsupported language; use one of {', '.join(SUPPORTED_LANGUAGES)}")
        return canonical

    def to_request(self) -> StoryRequest:
        return StoryRequest(
            prompt=self.prompt, age=self.age, length=self.length, language=self.language
        )


class IllustrationOut(BaseModel):
    url: str


class StoryOut(BaseModel):
    id: UUID
    title: str
    paragraphs: list[str]
    prompt: str
    language: str
    age: int
    length: str
    provider: str
    degraded: bool
    illustrate: bool
    illustration: IllustrationOut | None
    created_at: datetime

    @classmethod
    def of(cls, story: StoryRecord) -> StoryOut:
        return cls(
            id=story.id,
            title=story.title,
            paragraphs=list(story.paragraphs),
            prompt=story.prompt,
            language=story.language,
            age=story.age,
            length=story.length,
            provider=story.provider,
            degraded=story.degraded,
            illustrate=story.illustrate,
            illustration=IllustrationOut(url=story.illustration_url)
            if story.illustration_url
            else None,
            created_at=story.created_at,
        )


class StoryList(BaseModel):
    items: list[StoryOut]
    next_cursor: str | None = Field(
        description="Pass as `cursor` to get the next page; null on the last page."
    )


class Recommendations(BaseModel):
    age: int
    items: list[StoryOut]
