"""The offline storyteller: the last rung of the degradation ladder.

It needs no network, no key and no model: it assembles a story from bundled
templates around the child's prompt, so the service always has an answer. The
caller's words go into the story only when the prompt passed a content check
(`use_prompt`, see `app.services.moderation`); otherwise the story is about a
fixed, gentle topic of the language. The templates themselves are fixed text
written for small children (and checked against the local word lists by the
tests), so an offline story needs no check of its own. Its
stories are honest about what they are (`provider: "offline"`, `degraded:
true`). The same request gives the same story (the choice of template is seeded
by the request), which keeps repeated requests from a retrying phone consistent.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from app.providers.base import GeneratedStory, StoryRequest, Usage
from app.providers.languages import LANGUAGE_NAMES, base_language

NAME = "offline"
MODEL = "offline-templates-v1"


@dataclass(frozen=True)
class _Templates:
    title: tuple[str, ...]
    heroes: tuple[str, ...]
    places: tuple[str, ...]
    opening: tuple[str, ...]
    middle: tuple[str, ...]
    closing: tuple[str, ...]
    # The topic when the caller's words may not be used (fits every template's grammar).
    quiet_topic: str = "the stars"


_EN = _Templates(
    title=("{hero} and {topic}", "The Night of {topic}", "A Little Story About {topic}"),
    heroes=("Mila the fox", "Tomas the turtle", "Pip the sparrow", "Luna the kitten"),
    places=("a quiet valley", "a house by the sea", "the edge of a sleepy forest"),
    opening=(
        "Once upon a time, in {place}, there lived {hero}, who loved to dream about {topic}.",
        "In {place}, when the stars came out, {hero} was still thinking about {topic}.",
    ),
    middle=(
        "One morning {hero} decided to find out more about {topic}, and set off with a "
        "small bag and a big smile.",
        "On the way, {hero} met a kind old owl who said: 'Every question is the start of "
        "an adventure.'",
        "The path was long, but {hero} sang a little song, and the song made every step "
        "feel lighter.",
        "When the wind blew cold, {hero} shared a warm scarf with a shivering friend, and "
        "they walked on together.",
        "Together they counted clouds shaped like {topic}, and laughed until their tummies hurt.",
        "At the top of a hill, {hero} saw the whole world glowing softly in the evening light.",
        "{hero} learned that {topic} is even more wonderful when you share it with "
        "someone you love.",
    ),
    closing=(
        "Then {hero} went home, curled up in bed, and dreamed sweet dreams of {topic}. Goodnight.",
        "And as the moon rose over {place}, {hero} closed their eyes, happy and safe. The end.",
    ),
)

_ES = _Templates(
    quiet_topic="las estrellas",
    title=("{hero} y {topic}", "Una pequeña historia sobre {topic}"),
    heroes=("Mila la zorrita", "Tomás la tortuga", "Pipo el gorrión", "Luna la gatita"),
    places=("un valle tranquilo", "una casa junto al mar", "el borde de un bosque dormido"),
    opening=(
        "Había una vez, en {place}, alguien llamado {hero} que soñaba con {topic}.",
        "En {place}, cuando salían las estrellas, {hero} seguía pensando en {topic}.",
    ),
    middle=(
        "Una mañana, {hero} decidió aprender más sobre {topic} y salió con una mochila "
        "pequeña y una gran sonrisa.",
        "En el camino, un búho sabio le dijo: 'Cada pregunta es el comienzo de una aventura.'",
        "El camino era largo, pero {hero} cantaba una canción que hacía cada paso más ligero.",
        "Cuando sopló el viento frío, {hero} compartió su bufanda con un amigo, y siguieron "
        "juntos.",
        "Juntos contaron nubes con forma de {topic} y rieron muchísimo.",
        "Desde lo alto de una colina, {hero} vio el mundo entero brillar suavemente.",
        "{hero} aprendió que {topic} es aún más bonito cuando se comparte.",
    ),
    closing=(
        "Luego {hero} volvió a casa, se acurrucó en la cama y soñó con {topic}. Buenas noches.",
        "Y cuando la luna subió sobre {place}, {hero} cerró los ojos, feliz. Fin.",
    ),
)

_FR = _Templates(
    quiet_topic="la lune",
    title=("{hero} et {topic}", "Une petite histoire de {topic}"),
    heroes=("Mila la renarde", "Tomas la tortue", "Pip le moineau", "Luna la chatonne"),
    places=("une vallée tranquille", "une maison au bord de la mer", "l'orée d'une forêt"),
    opening=(
        "Il était une fois, dans {place}, {hero} qui rêvait de {topic}.",
        "Dans {place}, quand les étoiles brillaient, {hero} pensait encore à {topic}.",
    ),
    middle=(
        "Un matin, {hero} décida d'en savoir plus sur {topic} et partit avec un grand sourire.",
        "En chemin, une vieille chouette lui dit : « Chaque question commence une aventure. »",
        "Le chemin était long, mais {hero} chantait, et chaque pas semblait plus léger.",
        "Quand le vent devint froid, {hero} partagea son écharpe avec un ami.",
        "Ensemble, ils comptèrent les nuages en forme de {topic} en riant.",
        "Du haut d'une colline, {hero} vit le monde briller doucement.",
        "{hero} comprit que {topic} est plus beau quand on le partage.",
    ),
    closing=(
        "Puis {hero} rentra, se blottit dans son lit et rêva de {topic}. Bonne nuit.",
        "Et quand la lune se leva sur {place}, {hero} ferma les yeux, heureux. Fin.",
    ),
)

_DE = _Templates(
    quiet_topic="Sternschnuppen",
    title=("{hero} und {topic}", "Eine kleine Geschichte über {topic}"),
    heroes=("Mila die Füchsin", "Tomas die Schildkröte", "Pip der Spatz", "Luna das Kätzchen"),
    places=("einem stillen Tal", "einem Haus am Meer", "dem Rand eines schläfrigen Waldes"),
    opening=(
        "Es war einmal, in {place}, {hero}, der gern von {topic} träumte.",
        "In {place}, als die Sterne aufgingen, dachte {hero} noch an {topic}.",
    ),
    middle=(
        "Eines Morgens wollte {hero} mehr über {topic} erfahren und zog lächelnd los.",
        "Unterwegs sagte eine alte Eule: 'Jede Frage ist der Anfang eines Abenteuers.'",
        "Der Weg war lang, aber {hero} sang ein Lied, und jeder Schritt wurde leichter.",
        "Als der Wind kalt wurde, teilte {hero} den Schal mit einem Freund.",
        "Zusammen zählten sie Wolken, die wie {topic} aussahen, und lachten.",
        "Von einem Hügel aus sah {hero} die ganze Welt sanft leuchten.",
        "{hero} lernte, dass {topic} noch schöner ist, wenn man es teilt.",
    ),
    closing=(
        "Dann ging {hero} nach Hause, kuschelte sich ins Bett und träumte von {topic}. Gute Nacht.",
        "Und als der Mond über {place} aufging, schloss {hero} glücklich die Augen. Ende.",
    ),
)

_IT = _Templates(
    quiet_topic="Stellina",
    title=("{hero} e {topic}", "Una piccola storia su {topic}"),
    heroes=("Mila la volpe", "Tommaso la tartaruga", "Pip il passerotto", "Luna la gattina"),
    places=("una valle tranquilla", "una casa vicino al mare", "il limitare di un bosco"),
    opening=(
        "C'era una volta, in {place}, {hero}, che sognava {topic}.",
        "In {place}, quando spuntavano le stelle, {hero} pensava ancora a {topic}.",
    ),
    middle=(
        "Una mattina {hero} decise di scoprire di più su {topic} e partì con un gran sorriso.",
        "Lungo la strada, un vecchio gufo disse: 'Ogni domanda è l'inizio di un'avventura.'",
        "La strada era lunga, ma {hero} cantava, e ogni passo sembrava più leggero.",
        "Quando il vento si fece freddo, {hero} divise la sciarpa con un amico.",
        "Insieme contarono le nuvole a forma di {topic}, ridendo tanto.",
        "Dall'alto di una collina, {hero} vide il mondo intero brillare piano.",
        "{hero} capì che {topic} è ancora più bello quando lo si condivide.",
    ),
    closing=(
        "Poi {hero} tornò a casa, si rannicchiò nel letto e sognò {topic}. Buonanotte.",
        "E quando la luna salì su {place}, {hero} chiuse gli occhi, felice. Fine.",
    ),
)

_PT = _Templates(
    quiet_topic="Estrelinha",
    title=("{hero} e {topic}", "Uma pequena história sobre {topic}"),
    heroes=("Mila a raposinha", "Tomás a tartaruga", "Pip o pardal", "Luna a gatinha"),
    places=("um vale tranquilo", "uma casa perto do mar", "a beira de uma floresta"),
    opening=(
        "Era uma vez, em {place}, {hero}, que sonhava com {topic}.",
        "Em {place}, quando as estrelas apareciam, {hero} ainda pensava em {topic}.",
    ),
    middle=(
        "Certa manhã, {hero} decidiu saber mais sobre {topic} e partiu com um grande sorriso.",
        "No caminho, uma coruja sábia disse: 'Cada pergunta é o começo de uma aventura.'",
        "O caminho era longo, mas {hero} cantava, e cada passo ficava mais leve.",
        "Quando o vento esfriou, {hero} dividiu o cachecol com um amigo.",
        "Juntos contaram nuvens com forma de {topic} e riram muito.",
        "Do alto de uma colina, {hero} viu o mundo inteiro brilhar de mansinho.",
        "{hero} aprendeu que {topic} é ainda mais bonito quando é partilhado.",
    ),
    closing=(
        "Depois {hero} voltou para casa, aconchegou-se na cama e sonhou com {topic}. Boa noite.",
        "E quando a lua subiu sobre {place}, {hero} fechou os olhos, feliz. Fim.",
    ),
)

_NL = _Templates(
    quiet_topic="de sterren",
    title=("{hero} en {topic}", "Een klein verhaal over {topic}"),
    heroes=("Mila de vos", "Tomas de schildpad", "Pip de mus", "Luna het katje"),
    places=("een stille vallei", "een huis aan zee", "de rand van een slaperig bos"),
    opening=(
        "Er was eens, in {place}, {hero}, die droomde van {topic}.",
        "In {place}, toen de sterren opkwamen, dacht {hero} nog aan {topic}.",
    ),
    middle=(
        "Op een ochtend wilde {hero} meer weten over {topic} en ging vrolijk op pad.",
        "Onderweg zei een wijze uil: 'Elke vraag is het begin van een avontuur.'",
        "De weg was lang, maar {hero} zong een liedje, en elke stap werd lichter.",
        "Toen de wind koud werd, deelde {hero} de sjaal met een vriendje.",
        "Samen telden ze wolken in de vorm van {topic} en lachten heel hard.",
        "Vanaf een heuvel zag {hero} de hele wereld zachtjes glanzen.",
        "{hero} leerde dat {topic} nog mooier is als je het deelt.",
    ),
    closing=(
        "Toen ging {hero} naar huis, kroop in bed en droomde van {topic}. Slaap lekker.",
        "En toen de maan boven {place} opkwam, sloot {hero} blij de ogen. Einde.",
    ),
)

_BY_LANGUAGE = {"en": _EN, "es": _ES, "fr": _FR, "de": _DE, "it": _IT, "pt": _PT, "nl": _NL}
# Supported base languages deliberately told in English, for want of templates (none today).
_TOLD_IN_ENGLISH: frozenset[str] = frozenset()


def _check_templates() -> None:
    """Every supported base language has templates or is deliberately told in English."""
    missing = set(LANGUAGE_NAMES) - set(_BY_LANGUAGE) - _TOLD_IN_ENGLISH
    unknown = (set(_BY_LANGUAGE) | _TOLD_IN_ENGLISH) - set(LANGUAGE_NAMES)
    if missing or unknown:
        raise RuntimeError(
            f"offline templates out of step with app.providers.languages: "
            f"no templates for {sorted(missing)}, not supported: {sorted(unknown)}"
        )


_check_templates()


def _topic(prompt: str) -> str:
    topic = " ".join(prompt.split())
    for prefix in ("a story about ", "story about ", "about "):
        if topic.lower().startswith(prefix):
            topic = topic[len(prefix) :]
    topic = topic.rstrip(".!?")
    return topic[:80] or "the stars"


class OfflineStoryProvider:
    """Builds a story from bundled templates; never fails, never calls out."""

    name = NAME
    model = MODEL

    def compose(self, request: StoryRequest, *, use_prompt: bool = True) -> GeneratedStory:
        """The story for `request`; about the caller's prompt only with `use_prompt`
        (pass False unless the prompt passed a content check)."""
        # A tag whose language has no templates (or an unknown one) gets English.
        templates = _BY_LANGUAGE.get(base_language(request.language), _EN)
        seed = hashlib.sha256(
            f"{request.prompt}|{request.age}|{request.length}|{request.language}".encode()
        ).digest()
        rng = random.Random(seed)
        words = {
            "topic": _topic(request.prompt) if use_prompt else templates.quiet_topic,
            "hero": rng.choice(templates.heroes),
            "place": rng.choice(templates.places),
        }
        middle_count = max(1, request.paragraph_count - 2)
        middle = [templates.middle[i % len(templates.middle)] for i in range(middle_count)]
        paragraphs = [
            rng.choice(templates.opening),
            *middle,
            rng.choice(templates.closing),
        ][: request.paragraph_count]
        title = rng.choice(templates.title).format(**words)
        return GeneratedStory(
            title=title[:1].upper() + title[1:],
            paragraphs=tuple(p.format(**words) for p in paragraphs),
            provider=NAME,
            model=MODEL,
            usage=Usage(),
        )
