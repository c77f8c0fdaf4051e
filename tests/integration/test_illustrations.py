"""Illustrations that last: drawn in the background, checked, kept in our own store.

The real app over HTTP, the fake Replicate (its output files, deletable) and the
fake OpenAI (its moderation takes images), on a local directory and on an S3
wire-protocol server alike.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest

from app.db.sqlite import SqliteStoryRepository
from app.platform.config import (
    AuthSettings,
    IllustrationSettings,
    ObjectStoreSettings,
    Settings,
)
from app.platform.objects import ObjectStore
from tests.fakes.jwks import AUDIENCE, HS256_SECRET, ISSUER, claims, hs256_token
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.replicate_fake import FakeReplicate
from tests.fakes.server import Fault
from tests.integration.conftest import s3_settings
from tests.support import STORY_BODY, make_settings, serve

ILLUSTRATED = {**STORY_BODY, "illustrate": True}


def settings_for(
    tmp_path: Path,
    objects: ObjectStoreSettings,
    fake_openai: FakeOpenAI | None,
    fake_replicate: FakeReplicate,
    **changes: Any,
) -> Settings:
    changes.setdefault(
        "illustrations",
        IllustrationSettings(_env_file=None, sweep_seconds=0.2, lease_seconds=3.0),
    )
    return make_settings(
        sqlite_path=tmp_path / "s.db",
        openai_base_url=fake_openai.openai_base_url if fake_openai else None,
        replicate_base_url=fake_replicate.base_url,
        object_store=objects,
        **changes,
    )


async def settled(
    client: httpx.AsyncClient, story_id: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """The story once its picture is no longer pending (polled as the app would)."""
    for _ in range(1200):
        reply = await client.get(f"/v1/stories/{story_id}", headers=headers)
        story: dict[str, Any] = reply.json()
        if story["illustration"]["status"] != "pending":
            return story
        await asyncio.sleep(0.05)
    raise AssertionError(f"picture of {story_id} still pending")


async def test_the_story_comes_first_then_its_picture_byte_identical(
    fake_openai: FakeOpenAI,
    fake_replicate: FakeReplicate,
    object_store_settings: ObjectStoreSettings,
    tmp_path: Path,
) -> None:
    fake_replicate.hold_images = True  # the image model takes its time
    settings = settings_for(tmp_path, object_store_settings, fake_openai, fake_replicate)
    async with serve(settings) as client:
        created = await client.post("/v1/stories", json=ILLUSTRATED)
        story = created.json()
        url = f"/v1/stories/{story['id']}/illustration"
        early = await client.get(url)
        fake_replicate.hold_images = False
        ready = await settled(client, story["id"])
        picture = await client.get(url)
        again = await client.get(url, headers={"If-None-Match": picture.headers["ETag"]})

    # Returned while the picture was still being drawn, no upstream URL anywhere.
    assert created.status_code == 201
    assert story["illustration"] == {
        "status": "pending",
        "url": url,
        "media_type": None,
        "width": None,
        "height": None,
    }
    assert fake_replicate.base_url not in created.text
    assert early.status_code == 202
    assert int(early.headers["Retry-After"]) >= 1
    # Then drawn, fetched, checked by the moderation, stored, served.
    assert ready["illustration"] == {
        "status": "ready",
        "url": url,
        "media_type": "image/webp",
        "width": 64,
        "height": 48,
    }
    [upstream] = fake_replicate.picture_bytes()
    assert picture.status_code == 200
    assert picture.content == upstream
    assert picture.headers["Content-Type"] == "image/webp"
    assert picture.headers["ETag"] == f'"{hashlib.sha256(upstream).hexdigest()}"'
    assert picture.headers["Cache-Control"].startswith("private")
    assert again.status_code == 304
    assert again.content == b""
    [image] = fake_openai.image_inputs()
    assert image.startswith("data:image/webp;base64,")
    stored = ObjectStore.from_settings(object_store_settings)
    [key] = await stored.keys("illustrations/")
    assert key.startswith(f"illustrations/{story['id']}/")
    assert await stored.get(key) == upstream


async def test_the_picture_still_loads_after_the_upstream_deleted_its_file(
    fake_openai: FakeOpenAI,
    fake_replicate: FakeReplicate,
    object_store_settings: ObjectStoreSettings,
    tmp_path: Path,
) -> None:
    settings = settings_for(tmp_path, object_store_settings, fake_openai, fake_replicate)
    async with serve(settings) as client:
        story = (await client.post("/v1/stories", json=ILLUSTRATED)).json()
        await settled(client, story["id"])
        [upstream] = fake_replicate.picture_bytes()
        fake_replicate.delete_files()  # Replicate's one-hour retention has passed
        picture = await client.get(f"/v1/stories/{story['id']}/illustration")

    assert fake_replicate.picture_bytes() == []
    assert picture.status_code == 200
    assert picture.content == upstream


async def test_another_owner_gets_404_and_deleting_the_story_deletes_its_picture(
    fake_openai: FakeOpenAI, fake_replicate: FakeReplicate, tmp_path: Path
) -> None:
    alice, bob = ({"Authorization": f"Bearer {hs256_token(claims(sub))}"} for sub in "ab")
    auth = AuthSettings(
        _env_file=None, mode="jwt", jwt_secret=HS256_SECRET, issuer=ISSUER, audience=AUDIENCE
    )
    objects = ObjectStoreSettings(_env_file=None, local_path=tmp_path / "objects")
    settings = settings_for(tmp_path, objects, fake_openai, fake_replicate, auth=auth)
    store = ObjectStore.from_settings(objects)
    async with serve(settings) as client:
        story = (await client.post("/v1/stories", json=ILLUSTRATED, headers=alice)).json()
        await settled(client, story["id"], alice)
        url = f"/v1/stories/{story['id']}/illustration"
        owner = await client.get(url, headers=alice)
        other = await client.get(url, headers=bob)
        not_deleted = await client.delete(f"/v1/stories/{story['id']}", headers=bob)
        kept = await store.keys("illustrations/")
        deleted = await client.delete(f"/v1/stories/{story['id']}", headers=alice)
        gone = await client.get(url, headers=alice)
        story_gone = await client.get(f"/v1/stories/{story['id']}", headers=alice)

    assert owner.status_code == 200
    assert other.status_code == 404
    assert other.headers["Content-Type"] == "application/problem+json"
    assert not_deleted.status_code == 404
    assert len(kept) == 1
    assert deleted.status_code == 204
    assert gone.status_code == 404
    assert story_gone.status_code == 404
    assert await store.keys("illustrations/") == []


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("not_image", "not a PNG"), ("noisy", "bytes"), ("huge", "5000x2")],
    ids=["not-an-image", "too-many-bytes", "too-wide"],
)
async def test_a_reply_that_is_not_a_picture_we_keep_is_refused(
    fake_openai: FakeOpenAI,
    fake_replicate: FakeReplicate,
    tmp_path: Path,
    mode: str,
    reason: str,
) -> None:
    fake_replicate.picture_mode = mode
    objects = ObjectStoreSettings(_env_file=None, local_path=tmp_path / "objects")
    checks = IllustrationSettings(_env_file=None, sweep_seconds=0.2, max_bytes=16 * 1024)
    settings = settings_for(tmp_path, objects, fake_openai, fake_replicate, illustrations=checks)
    async with serve(settings) as client:
        created = await client.post("/v1/stories", json=ILLUSTRATED)
        story = await settled(client, created.json()["id"])
        picture = await client.get(f"/v1/stories/{story['id']}/illustration")

    assert created.status_code == 201
    assert story["illustration"] == {
        "status": "failed",
        "url": None,
        "media_type": None,
        "width": None,
        "height": None,
    }
    assert story["paragraphs"]  # the story stays
    assert picture.status_code == 404
    assert fake_replicate.created_count == 1  # refused once, not drawn again
    assert fake_openai.image_inputs() == []  # never even shown to the moderation
    assert await ObjectStore.from_settings(objects).keys() == []
    repository = await SqliteStoryRepository.open(tmp_path / "s.db")
    try:
        record = await repository.get(UUID(story["id"]), "anonymous")
    finally:
        await repository.close()
    assert record is not None
    assert record.illustration is not None
    assert reason in (record.illustration.error or "")


async def test_a_flagged_picture_is_dropped_and_the_story_stays(
    fake_openai: FakeOpenAI, fake_replicate: FakeReplicate, tmp_path: Path
) -> None:
    fake_openai.flag_images = True
    objects = ObjectStoreSettings(_env_file=None, local_path=tmp_path / "objects")
    settings = settings_for(tmp_path, objects, fake_openai, fake_replicate)
    async with serve(settings) as client:
        created = await client.post("/v1/stories", json=ILLUSTRATED)
        story = await settled(client, created.json()["id"])
        picture = await client.get(f"/v1/stories/{story['id']}/illustration")

    assert story["illustration"]["status"] == "failed"
    assert story["title"] == created.json()["title"]
    assert picture.status_code == 404
    assert len(fake_openai.image_inputs()) == 1
    assert await ObjectStore.from_settings(objects).keys() == []


async def test_no_picture_is_drawn_that_nothing_could_check(
    fake_replicate: FakeReplicate, tmp_path: Path
) -> None:
    # Replicate alone: no OpenAI moderation to check a picture with.
    objects = ObjectStoreSettings(_env_file=None, local_path=tmp_path / "objects")
    settings = settings_for(tmp_path, objects, None, fake_replicate)
    async with serve(settings) as client:
        created = await client.post("/v1/stories", json=ILLUSTRATED)

    assert created.status_code == 201
    assert created.json()["illustration"]["status"] == "failed"
    assert [p["model"] for p in fake_replicate.predictions()] == ["meta/meta-llama-3-8b-instruct"]


async def test_a_bucket_serves_the_owner_a_short_lived_signed_url(
    fake_openai: FakeOpenAI, fake_replicate: FakeReplicate, s3_endpoint: str, tmp_path: Path
) -> None:
    objects = s3_settings(s3_endpoint, serve="redirect", signed_url_seconds=60)
    settings = settings_for(tmp_path, objects, fake_openai, fake_replicate)
    async with serve(settings) as client:
        story = (await client.post("/v1/stories", json=ILLUSTRATED)).json()
        await settled(client, story["id"])
        reply = await client.get(f"/v1/stories/{story['id']}/illustration")

    assert reply.status_code == 307
    assert reply.headers["Cache-Control"] == "private, no-store"
    location = reply.headers["Location"]
    assert location.startswith(f"{s3_endpoint}/{objects.s3_bucket}/illustrations/{story['id']}/")
    assert "X-Amz-Expires=60" in location
    async with httpx.AsyncClient() as plain:
        picture = await plain.get(location)
    assert picture.content == fake_replicate.picture_bytes()[0]


async def test_a_picture_the_model_cannot_draw_is_tried_again_then_given_up(
    fake_openai: FakeOpenAI, fake_replicate: FakeReplicate, tmp_path: Path
) -> None:
    fake_replicate.set_fault(Fault.prediction_failed(), path="/v1/models/black-forest-labs")
    objects = ObjectStoreSettings(_env_file=None, local_path=tmp_path / "objects")
    attempts = IllustrationSettings(
        _env_file=None, sweep_seconds=0.05, max_attempts=2, lease_seconds=3.0
    )
    settings = settings_for(tmp_path, objects, fake_openai, fake_replicate, illustrations=attempts)
    async with serve(settings) as client:
        created = await client.post("/v1/stories", json=ILLUSTRATED)
        story = await settled(client, created.json()["id"])

    assert created.status_code == 201
    assert story["illustration"]["status"] == "failed"
    image_model = "black-forest-labs/flux-schnell"
    assert [p["model"] for p in fake_replicate.predictions()].count(image_model) == 2


async def test_a_worker_that_stops_mid_drawing_hands_the_picture_back(
    fake_openai: FakeOpenAI, fake_replicate: FakeReplicate, tmp_path: Path
) -> None:
    fake_replicate.hold_images = True
    objects = ObjectStoreSettings(_env_file=None, local_path=tmp_path / "objects")
    slow_sweep = IllustrationSettings(_env_file=None, sweep_seconds=3600, lease_seconds=3600)
    settings = settings_for(
        tmp_path, objects, fake_openai, fake_replicate, illustrations=slow_sweep
    )
    async with serve(settings) as client:
        story = (await client.post("/v1/stories", json=ILLUSTRATED)).json()
        for _ in range(1000):  # until the image model is drawing
            if fake_replicate.predictions():
                break
            await asyncio.sleep(0.02)
    # Stopped (the lifespan's end) while drawing: no hour-long lease left behind.
    fake_replicate.hold_images = False
    async with serve(settings) as client:  # its sweep at start takes the picture up
        ready = await settled(client, story["id"])

    assert ready["illustration"]["status"] == "ready"
