"""The public JSON shapes of the API (requests validated here, responses rendered here).

Prompt hygiene (`clean_prompt`): a prompt is stored, sent to paid upstreams and
shown to a child, so it is checked before anything is spent on it. It is
normalised to Unicode NFC; line breaks and tabs become spaces and runs of white
space one space; invisible characters at either end are trimmed. Refused with a
422 on `prompt`: control characters (category Cc: NUL, ESC, DEL, C1, ...),
bidirectional overrides and isolates (U+202A-202E, U+2066-2069: they make text
read differently from how it is stored), lone surrogates, Unicode tag characters
outside an emoji flag (text hidden from the reader but not from a model), a run
of variation selectors (data hidden after a character), and a prompt with nothing
visible in it (only white space, zero-width or other format characters, fillers).
Zero-width joiners and marks inside visible text stay: emoji sequences and
several scripts need them. Length limits count the normalised text.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.models import StoryRecord
from app.providers.base import StoryRequest
from app.providers.languages import SUPPORTED_LANGUAGES, canonical_tag

# Kept (as one space) though Cc: plain line breaks and tabs, as typed in a text box.
_SPACING_CONTROLS = frozenset("\t\n\r")
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Letters and symbols that render as nothing (Hangul fillers, the blank Braille cell).
_BLANK_GLYPHS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
# Categories that show nothing by themselves: white space, format, marks without a base.
_INVISIBLE_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Mn", "Me"})
_TAGS = "\U000e0000-\U000e007f"
# An emoji flag of a region (black flag, tag letters, cancel tag): the one use of tags.
_TAG_FLAG = re.compile("\U0001f3f4[\U000e0020-\U000e007e]+\U000e007f")
_TAG = re.compile(f"[{_TAGS}]")
_SELECTOR_RUN = re.compile("[\ufe00-\ufe0f\U000e0100-\U000e01ef]{2,}")
_WHITE_SPACE = re.compile(r"\s+")


def _code_point(char: str) -> str:
    return f"U+{ord(char):04X}"


def _invisible(char: str) -> bool:
    return char in _BLANK_GLYPHS or unicodedata.category(char) in _INVISIBLE_CATEGORIES


def clean_prompt(value: str) -> str:
    """The prompt as stored and sent upstream; ValueError (a reason a parent can read)
    when it holds hidden characters or nothing visible. See the module docstring."""
    text = unicodedata.normalize("NFC", value)
    for char in text:
        if char in _BIDI_CONTROLS:
            raise ValueError(
                f"contains a hidden text-direction character ({_code_point(char)}) that "
                "can make the text read differently from what was typed; "
                "please type the prompt again"
            )
        category = unicodedata.category(char)
        if category == "Cc" and char not in _SPACING_CONTROLS:
            raise ValueError(
                f"contains a hidden control character ({_code_point(char)}); "
                "please type the prompt again"
            )
        if category == "Cs":
            raise ValueError(
                f"contains a broken character ({_code_point(char)}); please type the prompt again"
            )
    if _TAG.search(_TAG_FLAG.sub("", text)) or _SELECTOR_RUN.search(text):
        raise ValueError(
            "contains hidden characters that a reader cannot see; please type the prompt again"
        )
    text = _WHITE_SPACE.sub(" ", text)
    start, end = 0, len(text)
    while start < end and _invisible(text[start]):
        start += 1
    while end > start and _invisible(text[end - 1]):
        end -= 1
    if start == end:
        raise ValueError("has no letters or symbols a reader can see; say what the story is about")
    return text[start:end]


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

    @field_validator("prompt", mode="before")
    @classmethod
    def _clean(cls, value: Any) -> Any:
        # Before pydantic's own checks, so min/max length count the normalised text;
        # anything but a string is left to them ("Input should be a valid string").
        return clean_prompt(value) if isinstance(value, str) else value

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
    # True: the local word list, not the moderation service, passed this story
    # (the service was unavailable); null: written before content checks existed.
    moderated_locally: bool | None
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
            moderated_locally=story.moderated_locally,
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
