"""The object store's contract, run against a local directory and an S3 wire-protocol server."""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest

from app.platform.config import ObjectStoreSettings
from app.platform.objects import ObjectStore, ObjectStoreUnavailableError
from tests.integration.conftest import s3_settings


async def test_a_stored_object_reads_back_byte_identical(
    object_store_settings: ObjectStoreSettings,
) -> None:
    store = ObjectStore.from_settings(object_store_settings)
    data = os.urandom(200_000)
    await store.put("illustrations/a/picture.webp", data)

    read = await store.get("illustrations/a/picture.webp")

    assert read is not None
    assert hashlib.sha256(read).hexdigest() == hashlib.sha256(data).hexdigest()
    assert await store.keys("illustrations/") == ["illustrations/a/picture.webp"]


async def test_a_missing_key_is_none_and_deleting_it_is_no_error(
    object_store_settings: ObjectStoreSettings,
) -> None:
    store = ObjectStore.from_settings(object_store_settings)
    assert await store.get("illustrations/none.webp") is None
    await store.delete("illustrations/none.webp")


async def test_a_put_replaces_and_a_delete_removes(
    object_store_settings: ObjectStoreSettings,
) -> None:
    store = ObjectStore.from_settings(object_store_settings)
    await store.put("k/one", b"first")
    await store.put("k/one", b"second")
    await store.put("k/two", b"other")
    assert await store.get("k/one") == b"second"

    await store.delete("k/one")

    assert await store.get("k/one") is None
    assert await store.keys("k/") == ["k/two"]
    assert await store.ping() >= 0


async def test_only_a_bucket_signs_urls(object_store_settings: ObjectStoreSettings) -> None:
    store = ObjectStore.from_settings(object_store_settings)
    await store.put("signed/p.png", b"\x89PNG picture")

    url = await store.signed_url("signed/p.png", 60)

    if object_store_settings.backend == "local":
        assert url is None
        return
    assert url is not None
    assert "X-Amz-Signature=" in url
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    assert response.status_code == 200
    assert response.content == b"\x89PNG picture"


async def test_a_bucket_that_refuses_is_unavailable(s3_endpoint: str) -> None:
    settings = s3_settings(s3_endpoint)
    missing = settings.model_copy(update={"s3_bucket": "no-such-bucket"})
    store = ObjectStore.from_settings(missing)
    with pytest.raises(ObjectStoreUnavailableError):
        await store.put("k", b"data")
