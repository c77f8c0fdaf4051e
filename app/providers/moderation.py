"""Content checks for a children's app: OpenAI's moderation endpoint, and a local word list.

`OpenAIModerator` asks OpenAI's moderation endpoint (`client.moderations.create`,
model `MODERATION_MODEL`) through the official SDK, its retries off, and maps
every SDK failure to the ProviderError tree like the story adapter does, so
`ResilientModerator` (a `Guard`: retry policy, the `openai` bulkhead, breaker
`openai:moderation`, the deadline) treats it like any upstream call.

`LocalModerator` needs no network and never fails: it checks a text against the
word list of the text's language and the English one (`moderation_terms/*.txt`,
package data; their format, rules and source are in `moderation_terms/README.md`).
It is conservative on purpose: it is what decides while OpenAI cannot answer,
and a children's app would rather refuse a harmless idea than pass a harmful one.

`app.services.moderation` decides when each applies (docs/security.md).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from importlib import resources

import httpx2
import openai
from openai import AsyncOpenAI

from app.platform.config import OpenAISettings
from app.providers.base import (
    ContentModerator,
    ModerationVerdict,
    ProviderResponseError,
)
from app.providers.languages import LANGUAGE_NAMES, base_language
from app.providers.openai import map_openai_error, openai_client
from app.providers.resilient import Guard

NAME = "openai"
LOCAL = "local"


class OpenAIModerator:
    """`POST /v1/moderations`: one text in, flagged or not (and why) out."""

    name = NAME

    def __init__(self, client: AsyncOpenAI, model: str) -> None:
        self._client = client
        self.model = model

    @classmethod
    def from_settings(cls, settings: OpenAISettings, model: str) -> OpenAIModerator:
        """A client of its own (as `OpenAIStoryProvider.from_settings` builds one): a
        pool full of slow story calls never holds up a check."""
        return cls(openai_client(settings), model)

    async def moderate(self, text: str) -> ModerationVerdict:
        try:
            # The SDK's own request (auth, base URL, timeouts, retries off, errors
            # mapped) through its documented raw path: the typed reply it would build
            # (every category and score as models) was a third of a check's CPU.
            reply = await self._client.post(
                "/moderations",
                cast_to=httpx2.Response,
                body={"model": self.model, "input": text},
            )
            data = reply.json()
        except openai.OpenAIError as error:
            raise map_openai_error(error) from error
        except ValueError as error:  # a body that is not JSON at all
            raise ProviderResponseError(NAME, f"unusable moderation reply: {error}") from error
        return _verdict(data)

    async def close(self) -> None:
        await self._client.close()


def _verdict(data: object) -> ModerationVerdict:
    """The verdict of a `POST /v1/moderations` reply: flagged if any result is, with
    the categories any result flagged. A reply of another shape is an upstream error
    (retried, counted), never a verdict."""
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list) or not results:
        raise ProviderResponseError(NAME, "moderation reply without a verdict")
    flagged = False
    categories: set[str] = set()
    for result in results:
        hits = result.get("categories") if isinstance(result, dict) else None
        if not isinstance(result, dict) or not isinstance(result.get("flagged"), bool):
            raise ProviderResponseError(NAME, "moderation reply without a verdict")
        if not isinstance(hits, dict):
            raise ProviderResponseError(NAME, "moderation reply of an unexpected shape")
        flagged = flagged or result["flagged"]
        categories.update(str(name) for name, hit in hits.items() if hit is True)
    return ModerationVerdict(flagged, NAME, tuple(sorted(categories)))


class ResilientModerator:
    """The moderator behind its guard (breaker `openai:moderation`)."""

    def __init__(self, inner: ContentModerator, guard: Guard) -> None:
        self._inner = inner
        self.guard = guard
        self.name = inner.name

    async def moderate(self, text: str) -> ModerationVerdict:
        return await self.guard.run(lambda: self._inner.moderate(text))


# --- the local check ------------------------------------------------------------------

#: Sections whose terms flag a text on their own (the verdict's categories).
BLOCK_SECTIONS = ("violence", "weapons", "self-harm", "sexual", "drugs", "hate", "profanity")
_CONTEXT_SECTIONS = ("harm", "target", "tool", "how-to", "not", "allow")
_SECTIONS = frozenset(BLOCK_SECTIONS + _CONTEXT_SECTIONS)
# Words between a harm term and a target, a how-to and what follows, a harm term and a
# tool, a negation and the harm term it negates.
TARGET_GAP, HOW_TO_GAP, TOOL_GAP, NOT_GAP = 3, 4, 8, 3

_LIGATURES = str.maketrans({"œ": "oe", "æ": "ae", "ø": "o", "ł": "l", "đ": "d", "ð": "d"})
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a"})
_LEET_S = str.maketrans({"$": "s"})
_RAW_WORDS = re.compile(r"[\w@$]+")


def fold(text: str) -> list[str]:
    """The words of `text` as the lists see them: case, diacritics and punctuation
    folded, digits for letters read as letters, letters spelt out one by one joined."""
    text = unicodedata.normalize("NFKD", text.casefold().translate(_LIGATURES))
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    words: list[str] = []
    for raw in _RAW_WORDS.findall(text):
        for word in raw.split("_"):
            if word and not word.isalpha() and any(ch.isalpha() for ch in word):
                word = word.translate(_LEET).translate(_LEET_S)
                word = "".join(ch for ch in word if ch.isalnum())
            if word and any(ch.isalnum() for ch in word):
                words.append(word)
    return _join_spelt_out(words)


def _join_spelt_out(words: list[str]) -> list[str]:
    joined: list[str] = []
    run: list[str] = []
    for word in [*words, ""]:
        if len(word) == 1 and word.isalpha():
            run.append(word)
            continue
        joined.extend(["".join(run)] if len(run) >= 3 else run)
        run = []
        if word:
            joined.append(word)
    return joined


Span = tuple[int, int]


@dataclass(frozen=True, slots=True)
class _Term:
    words: tuple[str, ...]
    prefix: bool  # the last word matches any ending

    def matches_at(self, words: list[str], start: int) -> bool:
        if start + len(self.words) > len(words):
            return False
        last = len(self.words) - 1
        for k, want in enumerate(self.words):
            got = words[start + k]
            if not (got == want or (self.prefix and k == last and got.startswith(want))):
                return False
        return True


class _Section:
    """The terms of one section, indexed for matching a text's words."""

    def __init__(self, terms: list[_Term]) -> None:
        singles = [t for t in terms if len(t.words) == 1]
        self._exact = frozenset(t.words[0] for t in singles if not t.prefix)
        stems = sorted({t.words[0] for t in singles if t.prefix}, key=len, reverse=True)
        self._stem = re.compile("|".join(map(re.escape, stems))) if stems else None
        self._phrases: dict[str, list[_Term]] = {}
        for term in terms:
            if len(term.words) > 1:
                self._phrases.setdefault(term.words[0], []).append(term)

    def spans(self, words: list[str]) -> list[Span]:
        found: list[Span] = []
        for i, word in enumerate(words):
            if not word:
                continue
            if word in self._exact or (self._stem is not None and self._stem.match(word)):
                found.append((i, i + 1))
            for phrase in self._phrases.get(word, ()):
                if phrase.matches_at(words, i):
                    found.append((i, i + len(phrase.words)))
        return found


@dataclass(frozen=True)
class WordList:
    """One language's list (`moderation_terms/<language>.txt`)."""

    language: str
    sections: dict[str, _Section]
    target_before_harm: bool

    @classmethod
    def parse(cls, language: str, text: str) -> WordList:
        terms: dict[str, list[_Term]] = {name: [] for name in _SECTIONS}
        section: str | None = None
        settings: dict[str, str] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            where = f"moderation_terms/{language}.txt:{number}"
            if not line or line.startswith("#"):
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1].strip()
                if section not in _SECTIONS and section != "settings":
                    raise ValueError(f"{where}: unknown section [{section}]")
                continue
            if section is None:
                raise ValueError(f"{where}: a term before any [section]")
            if section == "settings":
                key, _, value = line.partition("=")
                settings[key.strip()] = value.strip().lower()
                continue
            words = fold(line.rstrip("*"))
            if not words:
                raise ValueError(f"{where}: {line!r} holds no word")
            terms[section].append(_Term(tuple(words), line.endswith("*")))
        return cls(
            language,
            {name: _Section(found) for name, found in terms.items()},
            settings.get("target-before-harm") == "yes",
        )

    @classmethod
    def load(cls, language: str) -> WordList:
        path = resources.files("app.providers").joinpath(f"moderation_terms/{language}.txt")
        return cls.parse(language, path.read_text(encoding="utf-8"))


def _near(first: list[Span], then: list[Span], gap: int) -> bool:
    """Some span of `then` starts at most `gap` words after some span of `first` ends."""
    return any(0 <= start - end <= gap for _, end in first for start, _ in then)


class LocalModerator:
    """The word lists of every supported language, loaded (and checked) at once."""

    name = LOCAL

    def __init__(self, lists: dict[str, WordList] | None = None) -> None:
        self._lists = lists if lists is not None else _load_all()
        if "en" not in self._lists:
            raise ValueError("the local content check needs the English list")

    def check(self, text: str, language: str) -> ModerationVerdict:
        base = base_language(language)
        lists = [self._lists[base]] if base in self._lists and base != "en" else []
        lists.append(self._lists["en"])
        words = fold(text)
        for word_list in lists:
            for start, end in word_list.sections["allow"].spans(words):
                words[start:end] = [""] * (end - start)
        categories = {
            name
            for name in BLOCK_SECTIONS
            if any(word_list.sections[name].spans(words) for word_list in lists)
        }
        found = {
            name: [span for wl in lists for span in wl.sections[name].spans(words)]
            for name in ("harm", "target", "tool", "how-to")
        }
        harm, target, tool = found["harm"], found["target"], found["tool"]
        negations = [span for wl in lists for span in wl.sections["not"].spans(words)]
        # "never wanted to hurt anyone" is no threat; "how to" and a tool still count.
        meant = [span for span in harm if not _near(negations, [span], NOT_GAP)]
        if (
            _near(meant, target, TARGET_GAP)
            or (lists[0].target_before_harm and _near(target, meant, TARGET_GAP))
            or _near(found["how-to"], harm + tool, HOW_TO_GAP)
            or _near(harm, tool, TOOL_GAP)
            or _near(tool, harm, TOOL_GAP)
        ):
            categories.add("violence")
        return ModerationVerdict(bool(categories), LOCAL, tuple(sorted(categories)))


def _load_all() -> dict[str, WordList]:
    """Every supported language's list; one missing or malformed fails the start."""
    return {language: WordList.load(language) for language in sorted(LANGUAGE_NAMES)}
