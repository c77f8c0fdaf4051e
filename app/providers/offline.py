"""The offline storyteller: the last rung of the degradation ladder.

It needs no network, no key and no model: it assembles a story from bundled
templates around the child's prompt, so the service always has an answer. Its
stories are honest about what they are (`provider: "offline"`, `degraded:
true`). The same request gives the same story (the choice of template is seeded
by the request), which keeps repeated requests from a retrying phone consistent.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from app.providers.base import GeneratedStory, StoryRequest, Usage

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

_BY_LANGUAGE = {"en": _EN, "es": _ES, "fr": _FR, "de": _DE}


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

    async def generate(self, request: StoryRequest) -> GeneratedStory:
        return self.compose(request)

    def compose(self, request: StoryRequest) -> GeneratedStory:
        templates = _BY_LANGUAGE.get(request.language.split("-")[0].lower(), _EN)
        seed = hashlib.sha256(
            f"{request.prompt}|{request.age}|{request.length}|{request.language}".encode()
        ).digest()
        rng = random.Random(seed)
        words = {
            "topic": _topic(request.prompt),
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
