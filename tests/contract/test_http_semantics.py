"""What the contract says about HTTP itself, checked on the app: methods, bodies, redirects.

`OPTIONS` and `405` name in `Allow` exactly the methods the document has for the
path; a body that is not JSON is a 400, a JSON number with no fraction is an
integer, and no path is ever redirected (a redirect built from a forged `Host`
would send the caller elsewhere).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest

from app.platform.config import RateLimitSettings
from tests.contract.conftest import checked_in_schema
from tests.support import STORY_BODY, make_settings, serve

PROBLEM_JSON = "application/problem+json"
A_STORY_ID = "3f1c2a9e-7b4d-4e8a-9c61-2d5f8e0b7a14"


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(make_settings(sqlite_path=tmp_path / "stories.sqlite3")) as http:
        yield http


def documented_allow(path: str) -> set[str]:
    methods = checked_in_schema()["paths"][path]
    return {method.upper() for method in methods} | {"OPTIONS"}


def concrete(path: str) -> str:
    return path.replace("{story_id}", A_STORY_ID)


def allow_of(response: httpx.Response) -> set[str]:
    return {method.strip() for method in response.headers["allow"].split(",")}


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["request_id"] == response.headers["x-request-id"]
    return body


@pytest.mark.parametrize("path", sorted(checked_in_schema()["paths"]))
async def test_options_lists_the_documented_methods(client: httpx.AsyncClient, path: str) -> None:
    response = await client.options(concrete(path))
    assert response.status_code == 204
    assert allow_of(response) == documented_allow(path)


@pytest.mark.parametrize("method", ["PUT", "PATCH", "HEAD"])
async def test_an_undocumented_method_is_a_405_naming_the_documented_ones(
    client: httpx.AsyncClient, method: str
) -> None:
    response = await client.request(method, "/v1/stories")
    assert response.status_code == 405
    assert allow_of(response) == documented_allow("/v1/stories") == {"GET", "POST", "OPTIONS"}
    if method != "HEAD":
        assert problem(response, 405)["type"].endswith("/method-not-allowed")


async def test_a_forged_host_is_never_redirected_to(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/stories/", headers={"Host": "evil.example"})
    assert response.status_code == 404
    assert "location" not in response.headers
    problem(response, 404)


@pytest.mark.parametrize(
    "body",
    [b'{"prompt": "a cat", ', b"\xff\xfe\x00\x01not json", b"prompt=a+cat&age=6"],
    ids=["truncated", "not-utf8", "form"],
)
async def test_a_body_that_is_not_json_is_a_400(client: httpx.AsyncClient, body: bytes) -> None:
    response = await client.post(
        "/v1/stories", content=body, headers={"Content-Type": "application/json"}
    )
    found = problem(response, 400)
    assert found["type"].endswith("/malformed-request")
    assert found["errors"][0]["field"] == "body"


async def test_an_integral_number_is_an_integer(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/stories", json={**STORY_BODY, "age": 3.0})
    assert response.status_code == 201, response.text
    assert response.json()["age"] == 3


@pytest.mark.parametrize("age", [3.5, "3", True])
async def test_other_ages_stay_refused(client: httpx.AsyncClient, age: object) -> None:
    response = await client.post("/v1/stories", json={**STORY_BODY, "age": age})
    assert problem(response, 422)["errors"][0]["field"] == "age"


async def test_every_documented_language_is_accepted(client: httpx.AsyncClient) -> None:
    schema = checked_in_schema()["components"]["schemas"]["CreateStory"]
    for language in schema["properties"]["language"]["enum"]:
        response = await client.post("/v1/stories", json={**STORY_BODY, "language": language})
        assert response.status_code == 201, (language, response.text)
        assert response.json()["language"] == language


def assert_documented(response: httpx.Response, component: str) -> None:
    """The answer is the document's `components/responses/<component>`: its required
    headers are there, and its body is a valid `Problem`."""
    doc = checked_in_schema()
    documented = doc["components"]["responses"][component]
    for name, header in documented["headers"].items():
        required = header.get("required") or doc["components"]["headers"].get(
            header.get("$ref", "").rsplit("/", 1)[-1], {}
        ).get("required")
        if required:
            assert name.lower() in response.headers, name
    schema = {"$ref": "#/components/schemas/Problem", "components": doc["components"]}
    jsonschema_rs.validator_for(schema).validate(response.json())
    assert response.headers["content-type"] in documented["content"]


async def test_a_rate_limited_answer_is_as_documented(tmp_path: Path) -> None:
    limits = RateLimitSettings(_env_file=None, per_client="2/minute", default="2/minute")
    settings = make_settings(sqlite_path=tmp_path / "s.sqlite3", rate_limit=limits)
    async with serve(settings) as http:
        answers = [await http.get("/v1/stories") for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert_documented(answers[-1], "RateLimited")
    assert int(answers[-1].headers["retry-after"]) >= 1


async def test_a_body_too_large_is_as_documented(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/stories", json={**STORY_BODY, "prompt": "a" * 20_000})
    assert response.status_code == 413
    assert_documented(response, "PayloadTooLarge")


async def test_an_invalid_request_is_as_documented(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/stories", json={**STORY_BODY, "age": 13})
    assert response.status_code == 422
    assert_documented(response, "InvalidRequest")
