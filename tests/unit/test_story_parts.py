"""Pure parts of the story path: reply parsing, Retry-After, cursors, the offline storyteller,
the supported languages."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from pydantic import ValidationError

from app.models import PageCursor
from app.providers.base import ProviderResponseError, StoryRequest
from app.providers.languages import LANGUAGE_NAMES, SUPPORTED_LANGUAGES, base_language
from app.providers.offline import OfflineStoryProvider
from app.providers.openai import retry_after_seconds
from app.providers.prompting import language_name, parse_story, system_prompt
from app.schemas import CreateStory


def request(**changes: object) -> StoryRequest:
    values: dict[str, object] = {"prompt": "a brave snail", "age": 5, "length": "short"}
    values.update(changes)
    values.setdefault("language", "en")
    return StoryRequest(**values)  # type: ignore[arg-type]


def test_a_json_story_reply_parses() -> None:
    draft = parse_story("p", '{"title": " Snail ", "paragraphs": ["One.", " ", "Two."]}')

    assert draft.title == "Snail"
    assert draft.paragraphs == ["One.", "Two."]


def test_json_wrapped_in_prose_or_fences_parses() -> None:
    reply = 'Sure! ```json\n{"title": "T", "paragraphs": ["P"]}\n``` Enjoy.'

    assert parse_story("p", reply).title == "T"


@pytest.mark.parametrize(
    "reply",
    [
        None,
        "",
        "no json here",
        '{"title": "T"}',
        '{"title": "", "paragraphs": ["P"]}',
        '{"title": "T", "paragraphs": []}',
        '{"title": "T", "paragraphs": ["  "]}',
        '{"title": "T", "paragraphs": "not a list"}',
        "{broken json",
    ],
)
def test_a_reply_that_is_not_a_story_is_a_provider_response_error(reply: str | None) -> None:
    with pytest.raises(ProviderResponseError) as raised:
        parse_story("openai", reply)
    assert raised.value.retryable is True
    assert raised.value.provider == "openai"


def test_the_system_prompt_asks_for_the_length_age_and_language() -> None:
    text = system_prompt(request(length="long", age=9, language="es-MX"))

    assert "paragraphs: 8" in text
    assert "9 years old" in text
    assert "Spanish" in text


def test_retry_after_ms_wins_over_retry_after() -> None:
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5


def test_retry_after_in_seconds() -> None:
    assert retry_after_seconds({"retry-after": "2"}) == 2.0


def test_retry_after_as_an_http_date() -> None:
    when = datetime.fromtimestamp(datetime.now(UTC).timestamp() + 30, UTC)
    seconds = retry_after_seconds({"retry-after": format_datetime(when, usegmt=True)})

    assert seconds is not None
    assert 25 <= seconds <= 31


@pytest.mark.parametrize("headers", [None, {}, {"retry-after": "soon"}])
def test_missing_or_garbled_retry_after_is_none(headers: dict[str, str] | None) -> None:
    assert retry_after_seconds(headers) is None


def test_a_cursor_round_trips() -> None:
    cursor = PageCursor(datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC), uuid.uuid4())

    assert PageCursor.decode(cursor.encode()) == cursor


def _cursor_token(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "!!!",
        "bm90LWEtY3Vyc29y",
        "MjAyNi0wMS0wMnxub3QtYS11dWlk",
        _cursor_token(f"0001-01-01T00:00:00+14:00|{uuid.UUID(int=1)}"),
        _cursor_token(f"9999-12-31T23:59:59-14:00|{uuid.UUID(int=1)}"),
        _cursor_token(f"2026-01-01T00:00:00|{uuid.UUID(int=1)}"),
    ],
)
def test_a_foreign_cursor_is_refused(token: str) -> None:
    with pytest.raises(ValueError, match="cursor"):
        PageCursor.decode(token)


@pytest.mark.parametrize(("length", "count"), [("short", 3), ("medium", 5), ("long", 8)])
def test_the_offline_story_has_the_requested_number_of_paragraphs(length: str, count: int) -> None:
    story = OfflineStoryProvider().compose(request(length=length))

    assert len(story.paragraphs) == count
    assert story.provider == "offline"
    assert "brave snail" in " ".join(story.paragraphs)


def test_the_same_request_gets_the_same_offline_story() -> None:
    offline = OfflineStoryProvider()

    assert offline.compose(request()) == offline.compose(request())


@pytest.mark.parametrize(
    ("language", "word"), [("es", "Había"), ("fr", "Il était"), ("de", "Es war")]
)
def test_the_offline_story_speaks_the_requested_language(language: str, word: str) -> None:
    openings = {
        OfflineStoryProvider()
        .compose(request(language=language, prompt=f"topic {n}"))
        .paragraphs[0]
        for n in range(20)
    }

    assert any(word in opening for opening in openings)


TAGS = (
    "en", "en-US", "en-GB", "es", "es-ES", "es-MX", "fr", "fr-FR", "de", "de-DE",
    "it", "pt", "pt-BR", "nl",
)  # fmt: skip


def test_the_api_accepts_exactly_the_supported_tags_in_their_order() -> None:
    assert SUPPORTED_LANGUAGES == TAGS
    assert {base_language(tag) for tag in TAGS} == set(LANGUAGE_NAMES)


@pytest.mark.parametrize(("given", "canonical"), [("PT-br", "pt-BR"), (" en-gb ", "en-GB")])
def test_a_tag_matches_case_insensitively_and_comes_back_canonical(
    given: str, canonical: str
) -> None:
    assert CreateStory(prompt="x", age=5, language=given).language == canonical


@pytest.mark.parametrize("tag", ["klingon", "en-AU", "en_US", ""])
def test_an_unsupported_tag_is_refused_with_the_list(tag: str) -> None:
    with pytest.raises(ValidationError) as raised:
        CreateStory(prompt="x", age=5, language=tag)

    [error] = raised.value.errors()
    assert error["loc"] == ("language",)
    assert error["msg"] == (
        "Value error, unsupported language; use one of "
        "en, en-US, en-GB, es, es-ES, es-MX, fr, fr-FR, de, de-DE, it, pt, pt-BR, nl"
    )


@pytest.mark.parametrize("tag", TAGS)
def test_every_supported_tag_has_a_language_name_for_the_prompt(tag: str) -> None:
    assert language_name(tag) == LANGUAGE_NAMES[tag.split("-")[0]]
    assert f"Write in {language_name(tag)}." in system_prompt(request(language=tag))


def test_an_unknown_language_is_written_in_english() -> None:
    assert language_name("xx-YY") == "English"
    closing = OfflineStoryProvider().compose(request(language="xx-YY")).paragraphs[-1]
    assert closing.endswith(("Goodnight.", "The end."))
