"""`/v1/stories` and `/v1/recommendations`: parse, validate, call the service, render.

What each route answers is documented here (its success, its own 404 or 409);
what every API route answers (401, 429, 503, ...) is added by `app.http.openapi`.
"""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Header, Query, Request, Response, status

from app.dependencies import PrincipalDep, RateLimitedRoute, StoryServiceDep
from app.http.openapi import problem_responses
from app.platform.metrics import record_fallback, record_story_served
from app.schemas import (
    CURSOR_EXAMPLE,
    CURSOR_FORMAT,
    CreateStory,
    Recommendations,
    StoryList,
    StoryOut,
)

router = APIRouter(prefix="/v1", tags=["stories"], route_class=RateLimitedRoute)

_CREATED: dict[int | str, dict[str, Any]] = {
    201: {
        "description": "The story, written and stored (or, for a repeated `Idempotency-Key`, "
        "the first one).",
        "headers": {
            "Location": {
                "description": "The story's URL.",
                "required": True,
                "schema": {"type": "string", "format": "uri-reference"},
            },
            "Idempotent-Replayed": {
                "description": "`true`: this repeats the answer to an earlier request with "
                "the same `Idempotency-Key`; nothing new was written.",
                "schema": {"type": "string", "enum": ["true"]},
            },
        },
        "links": {
            "getStory": {
                "operationId": "getStory",
                "parameters": {"story_id": "$response.body#/id"},
                "description": "The story just written.",
            }
        },
    },
    **problem_responses(409),
}


@router.post(
    "/stories",
    status_code=status.HTTP_201_CREATED,
    response_model=StoryOut,
    summary="Write and store a story",
    responses=_CREATED,
)
async def create_story(
    body: CreateStory,
    request: Request,
    response: Response,
    stories: StoryServiceDep,
    principal: PrincipalDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            pattern=r"^[\x21-\x7e]+$",
            description="Repeat a request safely: the same key (1-255 visible ASCII "
            "characters, e.g. a UUID made once per story asked for) returns the first story. "
            "The same key with another body is a 422.",
            examples=["0b6c5e9e-8a7f-4f51-9d59-3c1f4c2f0b2e"],
        ),
    ] = None,
) -> StoryOut:
    created = await stories.create(
        principal, body.to_request(), illustrate=body.illustrate, idempotency_key=idempotency_key
    )
    story = created.story
    if not created.replayed:
        record_story_served(story.provider, story.degraded)
        if story.degraded:
            record_fallback(story.provider)
    request.scope.setdefault("state", {})["provider"] = story.provider
    response.headers["Location"] = f"/v1/stories/{story.id}"
    if created.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return StoryOut.of(story)


@router.get(
    "/stories/{story_id}",
    response_model=StoryOut,
    summary="One of the caller's stories",
    responses=problem_responses(404),
)
async def get_story(story_id: UUID, stories: StoryServiceDep, principal: PrincipalDep) -> StoryOut:
    return StoryOut.of(await stories.get(principal, story_id))


@router.get("/stories", response_model=StoryList, summary="The caller's stories, newest first")
async def list_stories(
    stories: StoryServiceDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Stories per page.")] = 20,
    cursor: Annotated[
        str | None,
        Query(
            description="Opaque: the `next_cursor` of the previous page, passed back "
            "unchanged. Never build, parse or store one for long: what is inside may "
            "change at any time. One this service did not hand out is a 422.",
            json_schema_extra={"format": CURSOR_FORMAT},
            examples=[CURSOR_EXAMPLE],
        ),
    ] = None,
) -> StoryList:
    page = await stories.list_page(principal, limit, cursor)
    return StoryList(
        items=[StoryOut.of(s) for s in page.items],
        next_cursor=page.next_cursor.encode() if page.next_cursor else None,
    )


@router.get(
    "/recommendations",
    response_model=Recommendations,
    summary="The caller's stories suited to an age",
    description="Stories within a year of `age`, exact age and non-degraded first. "
    "Degrades to an empty list rather than fail.",
)
async def get_recommendations(
    stories: StoryServiceDep,
    principal: PrincipalDep,
    age: Annotated[int, Query(ge=2, le=12, description="The child's age.", examples=[6])],
    limit: Annotated[int, Query(ge=1, le=20, description="At most this many.")] = 5,
) -> Recommendations:
    found = await stories.recommend(principal, age, limit)
    return Recommendations(age=age, items=[StoryOut.of(s) for s in found])
