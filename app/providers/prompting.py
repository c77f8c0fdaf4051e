"""What we ask a language model for, and how we check what it gives back.

Both text providers ask for the same JSON document (`{"title", "paragraphs"}`)
and validate the reply with the same model, so a reply that does not parse is a
`ProviderResponseError` whichever upstream sent it, never a 500.
"""

from __future__ import annotations

import json
import re

from pydantic import BaseModel, Field, ValidationError

from app.providers.base import ProviderResponseError, StoryRequest
from app.providers.languages import LANGUAGE_NAMES, base_language

STORY_JSON_SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "paragraphs": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["title", "paragraphs"],
    "additionalProperties": False,
}


class StoryDraft(BaseModel):
    title: str = Field(min_length=1, max_length=200)
    paragraphs: list[str] = Field(min_length=1, max_length=20)


def language_name(tag: str) -> str:
    """The English name of the tag's base language; English for one we do not know."""
    return LANGUAGE_NAMES.get(base_language(tag), "English")


def system_prompt(request: StoryRequest) -> str:
    return (
        "You write gentle, age-appropriate bedtime stories for children. "
        f"The reader is {request.age} years old; use words and sentences they understand. "
        f"Write in {language_name(request.language)}. No violence, fear or brand names. "
        'Reply with JSON only: {"title": string, "paragraphs": [string, ...]}.\n'
        f"paragraphs: {request.paragraph_count}"
    )


def user_prompt(request: StoryRequest) -> str:
    return f"Write a story about: {request.prompt}"


_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def parse_story(provider: str, content: str | None) -> StoryDraft:
    """Validates a model's reply; a reply that is not a story is an upstream error."""
    if not content:
        raise ProviderResponseError(provider, "empty reply")
    # Hosted open models sometimes wrap the JSON in prose or code fences.
    match = _JSON_OBJECT.search(content)
    if match is None:
        raise ProviderResponseError(provider, "reply holds no JSON object")
    try:
        data = json.loads(match.group(0))
        draft = StoryDraft.model_validate(data)
    except (json.JSONDecodeError, ValidationError) as error:
        raise ProviderResponseError(provider, f"reply is not a story: {error}") from error
    paragraphs = [p.strip() for p in draft.paragraphs if p.strip()]
    if not paragraphs or not draft.title.strip():
        raise ProviderResponseError(provider, "reply has an empty title or no paragraphs")
    return StoryDraft(title=draft.title.strip(), paragraphs=paragraphs)
