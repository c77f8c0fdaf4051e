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


#: OpenAPI `format`s of our own: what a pattern cannot say is in their descriptions.
PROMPT_FORMAT = "story-prompt"
CURSOR_FORMAT = "page-cursor"

_PROMPT_RULES = (
    "What the story is about: 1-500 characters once normalised (Unicode NFC; line breaks, "
    "tabs and runs of white space become one space; invisible characters trimmed at either "
    "end). Refused with a 422 on `prompt`: control characters other than line breaks and "
    "tabs, text-direction overrides and isolates (U+202A-202E, U+2066-2069), lone "
    "surrogates, Unicode tag characters outside an emoji flag, a run of variation "
    "selectors, nothing visible; and (`unsuitable-prompt`) a prompt not suitable for a "
    "children's story."
)


def _prompt_schema(schema: dict[str, Any]) -> None:
    # The limits count the normalised text ("e" + a combining accent is one), which
    # JSON Schema's `minLength`/`maxLength` (code points as sent) cannot say: a
    # `maxLength` would be a different rule. They are in the description.
    schema.pop("minLength", None)
    schema.pop("maxLength", None)
    schema["format"] = PROMPT_FORMAT


class CreateStory(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "a dragon who is afraid of the dark",
                    "age": 6,
                    "length": "short",
                    "language": "en",
                    "illustrate": False,
                }
            ]
        },
    )

    prompt: Annotated[
        str,
        Field(
            min_length=1,
            max_length=500,
            description=_PROMPT_RULES,
            json_schema_extra=_prompt_schema,
        ),
    ]
    age: Annotated[int, Field(ge=2, le=12, strict=True, description="The child's age.")]
    length: Annotated[
        Literal["short", "medium", "long"],
        Field(description="3, 5 or 8 paragraphs."),
    ] = "short"
    language: Annotated[
        str,
        Field(
            description="BCP-47 tag, one of these (matched case-insensitively; stories "
            "give it in this spelling).",
            json_schema_extra={"enum": list(SUPPORTED_LANGUAGES)},
        ),
    ] = "en"
    illustrate: Annotated[
        bool, Field(strict=True, description="Draw a picture for the story too.")
    ] = False

    @field_validator("age", mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        # JSON has one number type: 6.0 is the integer 6 (as JSON Schema's `integer`
        # says); 6.5, "6" and true stay refused.
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

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
    """The story's picture: drawn after the story is returned, then kept by this service."""

    status: Literal["pending", "ready", "failed"] = Field(
        description=(
            "`pending`: being drawn (poll the story, or `url`, which answers 202 until "
            "then); `ready`: `url` serves it; `failed`: none will be (the story stays)."
        )
    )
    url: str | None = Field(
        description="This service's URL of the picture (owner only); null once failed."
    )
    media_type: str | None = Field(default=None, description="Once ready: its media type.")
    width: int | None = Field(default=None, description="Once ready: pixels, read from the file.")
    height: int | None = Field(default=None, description="Once ready: pixels, read from the file.")

    @classmethod
    def of(cls, story: StoryRecord) -> IllustrationOut | None:
        picture = story.illustration
        if picture is None:
            return None
        status: Literal["pending", "ready", "failed"] = (
            "ready" if picture.status == "ready" else "failed"
        )
        if picture.status == "pending":
            status = "pending"
        return cls(
            status=status,
            url=None if status == "failed" else f"/v1/stories/{story.id}/illustration",
            media_type=picture.media_type if status == "ready" else None,
            width=picture.width if status == "ready" else None,
            height=picture.height if status == "ready" else None,
        )


_STORY_EXAMPLE: dict[str, Any] = {
    "id": "3f1c2a9e-7b4d-4e8a-9c61-2d5f8e0b7a14",
    "title": "Ember and the Night",
    "paragraphs": [
        "Ember was a small dragon who glowed a little when she laughed.",
        "Every night, when the sun went down, Ember hid under her wing.",
        "One night the fireflies showed her that the dark was full of friends.",
    ],
    "prompt": "a dragon who is afraid of the dark",
    "language": "en",
    "age": 6,
    "length": "short",
    "provider": "openai",
    "degraded": False,
    "illustrate": False,
    "illustration": None,
    "moderated_locally": False,
    "created_at": "2026-12-01T12:00:00Z",
}


class StoryOut(BaseModel):
    """A stored story. `provider`: who wrote it (`openai`, `replicate`, `cache`, `offline`;
    more may come); `degraded`: a fallback rung wrote it; `moderated_locally`: the local
    word list, not the moderation service, passed it (null: written before checks)."""

    model_config = ConfigDict(json_schema_extra={"examples": [_STORY_EXAMPLE]})

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
            illustration=IllustrationOut.of(story),
            created_at=story.created_at,
        )


CURSOR_EXAMPLE = (  # what the service hands out (2026-12-01T12:00:00Z, a story id)
    "MjAyNi0xMi0wMVQxMjowMDowMCswMDowMHwzZjFjMmE5ZS03YjRkLTRlOGEtOWM2MS0yZDVmOGUwYjdhMTQ"
)


class StoryList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"items": [_STORY_EXAMPLE], "next_cursor": CURSOR_EXAMPLE}]}
    )

    items: list[StoryOut]
    next_cursor: str | None = Field(
        description="Opaque: pass it back unchanged as `cursor` to get the next page; "
        "null on the last page.",
        json_schema_extra={"format": CURSOR_FORMAT},
    )


class Recommendations(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"age": 6, "items": [_STORY_EXAMPLE]}]}
    )

    age: int
    items: list[StoryOut]
