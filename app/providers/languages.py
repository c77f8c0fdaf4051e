"""The languages stories are written in: the one list the API, the prompts and the
offline storyteller all read.

Each base language (the part of a BCP-47 tag before the first `-`) has its English
name, which is what a model is told to write in, and the tags of it a request may
name, spelt canonically. A request's tag is matched case-insensitively and answered
in the canonical spelling.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

# base language -> (English name, accepted tags in canonical spelling).
# The order here is the order the API lists the tags in its error message.
_LANGUAGES: Final[Mapping[str, tuple[str, tuple[str, ...]]]] = MappingProxyType(
    {
        "en": ("English", ("en", "en-US", "en-GB")),
        "es": ("Spanish", ("es", "es-ES", "es-MX")),
        "fr": ("French", ("fr", "fr-FR")),
        "de": ("German", ("de", "de-DE")),
        "it": ("Italian", ("it",)),
        "pt": ("Portuguese", ("pt", "pt-BR")),
        "nl": ("Dutch", ("nl",)),
    }
)

# Base language -> its English name.
LANGUAGE_NAMES: Final[Mapping[str, str]] = MappingProxyType(
    {base: name for base, (name, _) in _LANGUAGES.items()}
)
# Every BCP-47 tag a request may name, canonically spelt.
SUPPORTED_LANGUAGES: Final[tuple[str, ...]] = tuple(
    tag for _, tags in _LANGUAGES.values() for tag in tags
)
_CANONICAL: Final[Mapping[str, str]] = MappingProxyType(
    {tag.lower(): tag for tag in SUPPORTED_LANGUAGES}
)


def base_language(tag: str) -> str:
    """`es-MX` -> `es`: the lower-cased part before the first `-`."""
    return tag.split("-")[0].lower()


def canonical_tag(value: str) -> str | None:
    """The supported tag `value` names (case and surrounding white space aside), or None."""
    return _CANONICAL.get(value.strip().lower())


def _check() -> None:
    for base, (_, tags) in _LANGUAGES.items():
        for tag in tags:
            if base_language(tag) != base:
                raise RuntimeError(f"language tag {tag!r} is listed under {base!r}")
    if len(_CANONICAL) != len(SUPPORTED_LANGUAGES):
        raise RuntimeError("a language tag is listed twice (ignoring case)")


_check()
