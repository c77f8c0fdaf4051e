"""The local content check: word lists per language, folding, rules (no network)."""

from __future__ import annotations

import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from app.providers.base import StoryRequest
from app.providers.languages import LANGUAGE_NAMES, SUPPORTED_LANGUAGES
from app.providers.moderation import BLOCK_SECTIONS, LocalModerator, WordList, fold
from app.providers.offline import OfflineStoryProvider
from app.services.moderation import story_text

ROOT = Path(__file__).resolve().parents[2]
TERMS = ROOT / "app" / "providers" / "moderation_terms"


@pytest.fixture(scope="module")
def local() -> LocalModerator:
    return LocalModerator()


def flagged(local: LocalModerator, text: str, language: str = "en") -> bool:
    return local.check(text, language).flagged


def test_the_knife_prompt_is_flagged_as_violence(local: LocalModerator) -> None:
    verdict = local.check("how to hurt my little sister with a knife", "en")

    assert verdict.flagged is True
    assert verdict.checker == "local"
    assert verdict.categories == ("violence",)


@pytest.mark.parametrize(
    ("language", "prompt"),
    [
        ("en", "How do I hurt my brother?"),
        ("en", "I want to kill the neighbour's cat"),
        ("en", "a story about sex"),
        ("en", "where to buy cocaine"),
        ("en", "how to make a bomb"),
        ("en", "I want to cut myself"),
        ("en", "the nazi hero"),
        ("en", "a fucking dragon"),
        ("es", "cómo lastimar a mi hermanita con un cuchillo"),
        ("es-MX", "quiero matar a mi perro"),
        ("fr", "comment blesser ma petite sœur avec un couteau"),
        ("fr-FR", "une histoire de drogue et d'alcool"),
        ("de", "Wie kann ich meine kleine Schwester mit einem Messer verletzen?"),
        ("de-DE", "ich will meine Schwester verletzen"),
        ("it", "come posso fare del male a mia sorella"),
        ("pt-BR", "como posso machucar minha irmã com uma faca"),
        ("nl", "hoe kan ik mijn zusje pijn doen met een mes"),
        ("nl", "ik wil mijn broertje pijn doen"),
        ("es", "how to hurt my sister"),  # English words in any language's text
    ],
)
def test_harmful_prompts_are_flagged_in_every_language(
    local: LocalModerator, language: str, prompt: str
) -> None:
    assert flagged(local, prompt, language)


@pytest.mark.parametrize(
    ("language", "prompt"),
    [
        ("en", "a dragon who is afraid of the dark"),
        ("en", "a bear who hurt his paw and a friend who helped"),
        ("en", "a dragon who never wanted to hurt anyone"),
        ("en", "a shooting star and a killer whale"),
        ("en", "a knight with a sword and a kind dragon"),
        ("en", "a kitten with a water gun"),
        ("en", "the skills of a thankful snail in Scunthorpe"),
        ("en", "a story about my sister and our dog"),
        ("es", "un dragón que tiene miedo de la oscuridad"),
        ("es", "una pistola de agua en la playa"),
        ("fr", "un lapin qui cherche la lune"),
        ("fr", "la râpe à fromage de mamie"),
        ("de", "ein Bär mit einem Zauberstab und einem Stab"),
        ("de", "heil und gesund nach Hause"),
        ("it", "una stella cadente sopra il mare"),
        ("pt", "um gato que adora estrelas"),
        ("nl", "de beer en het beertje gaan slapen"),
    ],
)
def test_ordinary_prompts_pass(local: LocalModerator, language: str, prompt: str) -> None:
    assert not flagged(local, prompt, language), local.check(prompt, language)


@pytest.mark.parametrize(
    "text",
    ["KILL", "Kîll", "k1ll", "k i l l", "k.i.l.l", "s3x", "$ex", "C0CAINE", "self-harm"],
)
def test_case_diacritics_digits_and_spelling_out_are_folded(
    local: LocalModerator, text: str
) -> None:
    assert flagged(local, f"a story about {text}")


def test_fold_keeps_words_and_folds_letters() -> None:
    assert fold("Sœur, Straße & café!") == ["soeur", "strasse", "cafe"]
    assert fold("quelqu'un") == ["quelqu", "un"]
    assert fold("5 little ducks") == ["5", "little", "ducks"]
    assert fold("a b") == ["a", "b"]  # two letters are no spelt-out word


def test_terms_match_whole_words_only(local: LocalModerator) -> None:
    assert not flagged(local, "the race had begun")  # gun
    assert not flagged(local, "a heroine and her stable")  # heroin, stab
    assert flagged(local, "the killers")  # kill*: any ending


def test_a_harm_word_needs_a_target_a_tool_or_a_how_to(local: LocalModerator) -> None:
    assert not flagged(local, "the bear hurt")
    assert flagged(local, "the bear hurt my little sister")
    assert flagged(local, "how to hurt")
    assert flagged(local, "hurt with a knife")
    assert not flagged(local, "a chef with a knife")
    assert flagged(local, "how to get a knife")


def test_verb_last_languages_also_read_the_target_before_the_harm(local: LocalModerator) -> None:
    assert flagged(local, "ich will meine Schwester verletzen", "de")
    assert not flagged(local, "meine Schwester wollte nicht verletzen", "de")
    # English reads the target after the harm word only.
    assert not flagged(local, "my sister hurt her knee")


def test_every_supported_language_has_a_list_shipped_as_package_data() -> None:
    assert {path.stem for path in TERMS.glob("*.txt")} == set(LANGUAGE_NAMES)
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["app"]
    for path in TERMS.glob("*.txt"):
        relative = path.relative_to(ROOT / "app").as_posix()
        assert any(fnmatch(relative, pattern) for pattern in patterns), relative


@pytest.mark.parametrize("language", sorted(LANGUAGE_NAMES))
def test_every_list_covers_every_category_and_loads(language: str) -> None:
    text = (TERMS / f"{language}.txt").read_text(encoding="utf-8")
    for section in (*BLOCK_SECTIONS, "harm", "target", "tool", "how-to", "not", "allow"):
        header = text.find(f"[{section}]")
        assert header >= 0, section
        first_term = text[header:].splitlines()[1]
        assert first_term, section
        assert not first_term.startswith(("[", "#")), section
    assert WordList.load(language).language == language


def test_a_malformed_list_is_refused_with_its_place() -> None:
    with pytest.raises(ValueError, match=r"xx\.txt:2: unknown section \[gore\]"):
        WordList.parse("xx", "# a comment\n[gore]\nblood\n")
    with pytest.raises(ValueError, match=r"xx\.txt:1: a term before any \[section\]"):
        WordList.parse("xx", "blood\n")


@pytest.mark.parametrize("tag", SUPPORTED_LANGUAGES)
@pytest.mark.parametrize("use_prompt", [True, False])
def test_offline_stories_pass_the_local_check_in_every_language(
    local: LocalModerator, tag: str, use_prompt: bool
) -> None:
    offline = OfflineStoryProvider()
    for n, age in enumerate((2, 5, 8, 12)):
        for length in ("short", "medium", "long"):
            request = StoryRequest(f"a sleepy owl number {n}", age, length, tag)
            story = offline.compose(request, use_prompt=use_prompt)
            assert not local.check(story_text(story), tag).flagged, story


@pytest.mark.parametrize("tag", SUPPORTED_LANGUAGES)
def test_without_a_checked_prompt_the_offline_story_has_none_of_its_words(tag: str) -> None:
    prompt = "zorblax quizzical hippogriff"
    story = OfflineStoryProvider().compose(StoryRequest(prompt, 5, "long", tag), use_prompt=False)

    text = story_text(story).lower()
    assert all(word not in text for word in prompt.split())
    assert len(story.paragraphs) == 8
