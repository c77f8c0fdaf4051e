"""A worker killed mid-drawing leaves no picture pending forever.

The worker that wrote the story holds its pending picture on a lease. Killed
(SIGKILL: no shutdown code runs) while the image model is still drawing, it
renews nothing; a fresh process's sweep finds the lapsed lease at start and
draws the picture again, or gives up on it once it was tried
`ILLUSTRATION_MAX_ATTEMPTS` times. Either way the story leaves `pending`.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.replicate_fake import FakeReplicate
from tests.ops.servers import app_server
from tests.support import STORY_BODY

IMAGE_MODEL = "black-forest-labs/flux-schnell"


def env_for(
    tmp_path: Path, fake_openai: FakeOpenAI, fake_replicate: FakeReplicate, **more: str
) -> dict[str, str]:
    return {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": fake_openai.openai_base_url,
        "REPLICATE_API_TOKEN": "r8_test",
        "REPLICATE_BASE_URL": fake_replicate.base_url,
        "REPLICATE_POLL_INTERVAL_SECONDS": "0.05",
        "DATABASE_SQLITE_PATH": str(tmp_path / "stories.sqlite3"),
        "OBJECT_STORE_BACKEND": "local",
        "OBJECT_STORE_LOCAL_PATH": str(tmp_path / "objects"),
        "ILLUSTRATION_LEASE_SECONDS": "1",
        "ILLUSTRATION_SWEEP_SECONDS": "0.2",
        **more,
    }


def image_predictions(fake_replicate: FakeReplicate) -> int:
    return sum(p["model"] == IMAGE_MODEL for p in fake_replicate.predictions())


def wait_for(what: str, check: Any, output: Any, within: float = 60.0) -> Any:
    give_up = time.monotonic() + within
    while time.monotonic() < give_up:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    pytest.fail(f"{what}: not within {within} s\n{output()}")


def settled_story(url: str, story_id: str) -> dict[str, Any] | None:
    story: dict[str, Any] = httpx.get(f"{url}/v1/stories/{story_id}", timeout=5).json()
    return None if story["illustration"]["status"] == "pending" else story


def kill_mid_drawing(
    env: dict[str, str], fake_openai: FakeOpenAI, fake_replicate: FakeReplicate
) -> str:
    """Creates an illustrated story, kills its worker while the picture is drawn; its id."""
    fake_replicate.hold_images = True
    with app_server(env) as doomed:
        created = httpx.post(
            f"{doomed.url}/v1/stories", json={**STORY_BODY, "illustrate": True}, timeout=30
        )
        assert created.status_code == 201
        assert created.json()["illustration"]["status"] == "pending"
        wait_for("drawing started", lambda: image_predictions(fake_replicate), doomed.output)
        os.killpg(doomed.process.pid, signal.SIGKILL)
        doomed.process.wait(timeout=10)
    fake_replicate.hold_images = False
    story_id: str = created.json()["id"]
    return story_id


def test_a_fresh_worker_draws_the_picture_a_killed_one_left(
    fake_openai: FakeOpenAI, fake_replicate: FakeReplicate, tmp_path: Path
) -> None:
    env = env_for(tmp_path, fake_openai, fake_replicate)
    story_id = kill_mid_drawing(env, fake_openai, fake_replicate)

    with app_server(env) as fresh:
        story = wait_for(
            "picture settled", lambda: settled_story(fresh.url, story_id), fresh.output
        )
        picture = httpx.get(f"{fresh.url}/v1/stories/{story_id}/illustration", timeout=5)

    assert story["illustration"]["status"] == "ready"
    assert image_predictions(fake_replicate) == 2  # the killed worker's, and the fresh one's
    assert picture.status_code == 200
    assert picture.content in fake_replicate.picture_bytes()


def test_a_picture_out_of_attempts_is_failed_not_left_pending(
    fake_openai: FakeOpenAI, fake_replicate: FakeReplicate, tmp_path: Path
) -> None:
    env = env_for(tmp_path, fake_openai, fake_replicate, ILLUSTRATION_MAX_ATTEMPTS="1")
    story_id = kill_mid_drawing(env, fake_openai, fake_replicate)

    with app_server(env) as fresh:
        story = wait_for(
            "picture settled", lambda: settled_story(fresh.url, story_id), fresh.output
        )
        picture = httpx.get(f"{fresh.url}/v1/stories/{story_id}/illustration", timeout=5)

    assert story["illustration"]["status"] == "failed"
    assert story["paragraphs"]  # the story stays
    assert image_predictions(fake_replicate) == 1  # not drawn again
    assert picture.status_code == 404
