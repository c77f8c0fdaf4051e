"""`python -m app.openapi > docs/openapi.json`: the API's contract, as the app serves it.

Built from explicit default settings (docs on, no `.env`, nothing from the
environment that could change a route), and written with a fixed layout, so the
same code always writes the same bytes. `tests/contract/test_openapi_document.py`
fails when the checked-in file and the served document differ: a change to the
contract is always a visible diff. Nothing is opened: the app is only built.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from app.main import create_app
from app.platform.config import AuthSettings, Settings


def document() -> dict[str, Any]:
    settings = Settings(
        _env_file=None,
        app_env="development",
        docs_enabled=True,
        auth=AuthSettings(_env_file=None, mode="none"),
    )
    return create_app(settings).openapi()


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    sys.stdout.write(render(document()))


if __name__ == "__main__":
    main()
