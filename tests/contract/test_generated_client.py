"""A client generated from the checked-in contract works against the running app.

`openapi-python-client` generates a package from `docs/openapi.json` into the
test's temporary directory (generated afresh on every run rather than checked
in: nothing to keep in step, and a schema change that breaks generation fails
here at once), then the test uses it as the mobile app's developers would use
theirs: create, fetch and list stories, and read a problem as the typed model.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from uuid import uuid4

import pytest

from tests.contract.conftest import SCHEMA_FILE, bearer
from tests.support import ROOT, Server

pytestmark = pytest.mark.slow

PACKAGE = "story_client"
CONFIG = f"package_name_override: {PACKAGE}\nproject_name_override: story-client\npost_hooks: []\n"


@pytest.fixture(scope="module")
def story_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    directory = tmp_path_factory.mktemp("generated")
    config = directory / "config.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    generator = Path(sys.executable).with_name("openapi-python-client")
    run = subprocess.run(
        [
            str(generator),
            "generate",
            "--path",
            str(SCHEMA_FILE),
            "--meta",
            "none",
            "--output-path",
            str(directory / PACKAGE),
            "--config",
            str(config),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    sys.path.insert(0, str(directory))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(directory))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def test_create_fetch_and_list_with_the_generated_client(
    story_client: ModuleType, contract_server: Server
) -> None:
    api = importlib.import_module(f"{PACKAGE}.api.stories")
    models = importlib.import_module(f"{PACKAGE}.models")
    for name in ("create_story", "get_story", "list_stories"):
        importlib.import_module(f"{api.__name__}.{name}")
    client = story_client.AuthenticatedClient(
        base_url=contract_server.url, token=bearer(f"client-{uuid4().hex}")
    )
    body = models.CreateStory(
        prompt="a hedgehog who learns to swim",
        age=5,
        length=models.CreateStoryLength.MEDIUM,
        language=models.CreateStoryLanguage.EN_GB,
    )
    created = api.create_story.sync_detailed(client=client, body=body)
    assert created.status_code == 201, (created.content, contract_server.output()[-5000:])
    story = created.parsed
    assert isinstance(story, models.StoryOut)
    assert (story.age, story.length, story.language) == (5, "medium", "en-GB")
    assert len(story.paragraphs) == 5
    assert created.headers["location"] == f"/v1/stories/{story.id}"

    fetched = api.get_story.sync(story_id=story.id, client=client)
    assert isinstance(fetched, models.StoryOut)
    assert (fetched.id, fetched.title) == (story.id, story.title)

    page = api.list_stories.sync(client=client, limit=1)
    assert isinstance(page, models.StoryList)
    assert [item.id for item in page.items] == [story.id]


def test_a_problem_reads_as_the_typed_model(
    story_client: ModuleType, contract_server: Server
) -> None:
    api = importlib.import_module(f"{PACKAGE}.api.stories.get_story")
    models = importlib.import_module(f"{PACKAGE}.models")
    client = story_client.AuthenticatedClient(base_url=contract_server.url, token=bearer())
    missing = api.sync_detailed(story_id=uuid4(), client=client)
    assert missing.status_code == 404
    problem = missing.parsed
    assert isinstance(problem, models.Problem)
    assert problem.status == 404
    assert problem.type_.endswith("/not-found")
    assert problem.request_id == missing.headers["x-request-id"]

    create = importlib.import_module(f"{PACKAGE}.api.stories.create_story")
    invalid = create.sync_detailed(client=client, body=models.CreateStory(prompt="a cat", age=13))
    assert invalid.status_code == 422
    assert isinstance(invalid.parsed, models.Problem)
    assert [(e.field, e.reason) for e in invalid.parsed.errors] == [
        ("age", "Input should be less than or equal to 12")
    ]

    anonymous = story_client.Client(base_url=contract_server.url)
    refused = api.sync_detailed(story_id=uuid4(), client=anonymous)
    assert refused.status_code == 401
    assert isinstance(refused.parsed, models.Problem)
    assert refused.headers["www-authenticate"] == 'Bearer realm="stories"'
