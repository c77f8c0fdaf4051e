"""Benchmark: what the child waits for, and what serving a stored picture costs (issue 14).

Prints, for the app served in-process over ASGI with the fake OpenAI and the
fake Replicate (threads of this process; SQLite in a temporary directory):

1. **Story first.** `--stories` illustrated stories, one after another, while
   the fake image model holds every picture for `--image-seconds`: the time to
   the `201` (the story) and the time until the picture is `ready` (polled as
   the app would). Before issue 14 the `201` came only after the picture.
2. **Serving.** `--requests` sequential `GET /v1/stories/{id}/illustration` of
   one stored picture, on a local directory and on an S3 wire-protocol server
   (moto, in a thread): p50 / p99 / max of a full `200` and of a `304`
   (`If-None-Match`); and, on the bucket, of a `307` to a signed URL.

    python -m bench.bench_illustrations [--stories 5] [--image-seconds 2] [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from app.platform.config import IllustrationSettings, ObjectStoreSettings
from tests.fakes.openai_fake import FakeOpenAI
from tests.fakes.replicate_fake import FakeReplicate
from tests.integration.conftest import s3_settings
from tests.support import STORY_BODY, make_settings, serve

ILLUSTRATED = {**STORY_BODY, "illustrate": True}


def figures(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return (
        f"p50 {statistics.median(ordered) * 1000:7.2f} ms  p99 {p99 * 1000:7.2f} ms  "
        f"max {ordered[-1] * 1000:7.2f} ms  (n={len(ordered)})"
    )


async def until_ready(client: httpx.AsyncClient, story_id: str) -> str:
    while True:
        story = (await client.get(f"/v1/stories/{story_id}")).json()
        if story["illustration"]["status"] != "pending":
            return str(story["illustration"]["status"])
        await asyncio.sleep(0.02)


async def story_first(
    openai: FakeOpenAI, replicate: FakeReplicate, stories: int, image_seconds: float, tmp: Path
) -> None:
    print(f"\n1. Story first: {stories} illustrated stories, each picture held {image_seconds} s")
    settings = make_settings(
        sqlite_path=tmp / "first.db",
        openai_base_url=openai.openai_base_url,
        replicate_base_url=replicate.base_url,
        object_store=ObjectStoreSettings(_env_file=None, local_path=tmp / "first-objects"),
        illustrations=IllustrationSettings(_env_file=None, sweep_seconds=0.2),
    )
    to_story, to_picture = [], []

    def let_go() -> None:
        replicate.hold_images = False

    async with serve(settings) as client:
        for _ in range(stories):
            replicate.hold_images = True
            release = threading.Timer(image_seconds, let_go)
            started = time.perf_counter()
            release.start()
            created = await client.post("/v1/stories", json=ILLUSTRATED)
            to_story.append(time.perf_counter() - started)
            status = await until_ready(client, created.json()["id"])
            to_picture.append(time.perf_counter() - started)
            release.join()
            assert status == "ready", status
    print(f"   201 (the story)      {figures(to_story)}")
    print(f"   picture ready        {figures(to_picture)}")


async def serving(
    openai: FakeOpenAI, replicate: FakeReplicate, objects: ObjectStoreSettings, n: int, tmp: Path
) -> None:
    label = objects.backend + (" (redirect)" if objects.serve == "redirect" else "")
    settings = make_settings(
        sqlite_path=tmp / f"serve-{label}.db",
        openai_base_url=openai.openai_base_url,
        replicate_base_url=replicate.base_url,
        object_store=objects,
        illustrations=IllustrationSettings(_env_file=None, sweep_seconds=0.2),
    )
    async with serve(settings) as client:
        story = (await client.post("/v1/stories", json=ILLUSTRATED)).json()
        await until_ready(client, story["id"])
        url = f"/v1/stories/{story['id']}/illustration"
        first = await client.get(url)
        etag = first.headers.get("ETag", "")
        full, conditional = [], []
        for _ in range(n):
            started = time.perf_counter()
            reply = await client.get(url)
            full.append(time.perf_counter() - started)
            started = time.perf_counter()
            await client.get(url, headers={"If-None-Match": etag})
            conditional.append(time.perf_counter() - started)
    size = len(first.content) if first.status_code == 200 else 0
    print(f"   {label:16} {reply.status_code} ({size} B)  {figures(full)}")
    print(f"   {label:16} 304          {figures(conditional)}")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stories", type=int, default=5)
    parser.add_argument("--image-seconds", type=float, default=2.0)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    openai, replicate = FakeOpenAI(), FakeReplicate()
    openai.start()
    replicate.start()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            tmp = Path(scratch)
            await story_first(openai, replicate, args.stories, args.image_seconds, tmp)
            print(f"\n2. Serving one stored picture, {args.requests} sequential requests each")
            local = ObjectStoreSettings(_env_file=None, local_path=tmp / "objects")
            for objects in (local, s3_settings(endpoint), s3_settings(endpoint, serve="redirect")):
                replicate.reset()
                await serving(openai, replicate, objects, args.requests, tmp)
    finally:
        openai.stop()
        replicate.stop()
        moto.stop()


if __name__ == "__main__":
    asyncio.run(main())
