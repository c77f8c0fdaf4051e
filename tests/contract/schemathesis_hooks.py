"""What schemathesis cannot read from a pattern: the service's own string formats.

`docs/openapi.json` marks two strings with formats of ours (OpenAPI lets a
document name its own), described there in words:

- `story-prompt`: text a reader can see. Drawn here from letters, digits,
  punctuation, symbols and spaces (never control, format or combining
  characters alone, nor the blank-looking fillers), at least one of them not a
  space, at most 500 characters once in Unicode NFC;
- `page-cursor`: opaque to clients; what this service hands out, built here the
  way it builds one (base64url of a UTC time and a story id), so a well-formed
  cursor can be told from one it never handed out.

Loaded with `SCHEMATHESIS_HOOKS=tests.contract.schemathesis_hooks`. A format's
complement cannot be drawn: schemathesis takes *any* string as violating a
format it does not know, and a prompt like "Ц" is a fine prompt. So negative
cases whose only change is one of these two formats are left out; every other
negative case (wrong types, missing or extra members, ...) still runs, and what
the formats refuse is tested by tests/integration/test_input_hygiene.py and
test_stories_api.py (hidden characters, a cursor never handed out).

And one rule of use: a client makes one `Idempotency-Key` per story it asks
for (README). The fuzzer draws keys from a small alphabet and sends `0` with
many different bodies, which the service rightly refuses with 422
(draft-ietf-httpapi-idempotency-key-header: a key reused with another payload).
So each valid key is made unique before the request goes out; malformed keys
are sent as drawn. Replays and reuse are tested in tests/integration/test_idempotency.py.
"""

from __future__ import annotations

import base64
import re
import unicodedata
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import schemathesis
from hypothesis import strategies as st

_BLANK = "\u115f\u1160\u3164\uffa0\u2800"
_VISIBLE = st.characters(categories=("L", "N", "P", "S"), exclude_characters=_BLANK)


def _prompt(parts: list[str]) -> str:
    return "".join(parts)


def _fits(text: str) -> bool:
    normalised = unicodedata.normalize("NFC", text)
    return bool(normalised.strip()) and len(" ".join(normalised.split())) <= 500


PROMPTS = (
    st.lists(st.one_of(_VISIBLE, st.just(" ")), min_size=1, max_size=120).map(_prompt).filter(_fits)
)


def _cursor(when: datetime, story_id: UUID) -> str:
    raw = f"{when.isoformat()}|{story_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


CURSORS = st.builds(
    _cursor,
    st.datetimes(
        min_value=datetime(2000, 1, 1),  # the zone is given below
        max_value=datetime(2100, 1, 1),
        timezones=st.just(UTC),
    ),
    st.uuids(),
)

schemathesis.openapi.format("story-prompt", PROMPTS)
schemathesis.openapi.format("page-cursor", CURSORS)


_KEY = re.compile(r"[\x21-\x7e]{1,255}")


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    key = (case.headers or {}).get("Idempotency-Key")
    if isinstance(key, str) and _KEY.fullmatch(key):
        case.headers["Idempotency-Key"] = f"{key[:200]}-{uuid4().hex}"


# The members that carry these formats: the body's `prompt`, the query's `cursor`.
_OUR_FORMATTED = frozenset({"prompt", "cursor"})


def _names(mutation: Any) -> set[str]:
    pointer = str(mutation.schema_pointer or "").rsplit("/", 1)[-1]
    return {*(str(part) for part in mutation.path), pointer, str(mutation.parameter)}


def _only_our_formats_broken(case: Any) -> bool:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_negative:
        return False
    mutations = getattr(meta.phase.data, "mutations", ())
    return bool(mutations) and all(
        set(m.keywords) == {"format"} and _names(m) & _OUR_FORMATTED for m in mutations
    )


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    return not _only_our_formats_broken(case)
