"""`/v1/stories` and `/v1/recommendations`: parse, validate, call the service, render."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Header, Query, Request, Response, status

from app.dependencies import PrincipalDep, StoryServiceDep
from app.platform.metrics import record_fallback, record_story_served
from app.schemas import CreateStory, Recommendations, StoryList, StoryOut

router = APIRouter(prefix="/v1", tags=["stories"])

_PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}


@router.post(
    "/stories",
    status_code=status.HTTP_201_CREATED,
    response_model=StoryOut,
    responses={409: _PROBLEM, 422: _PROBLEM, 503: _PROBLEM},
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
            description="Repeat a request safely: the same key returns the first story.",
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


@router.get("/stories/{story_id}", response_model=StoryOut, responses={404: _PROBLEM})
async def get_story(story_id: UUID, stories: StoryServiceDep, principal: PrincipalDep) -> StoryOut:
    return StoryOut.of(await stories.get(principal, story_id))


@router.get("/stories", response_model=StoryList, responses={422: _PROBLEM})
async def list_stories(
    stories: StoryServiceDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> StoryList:
    page = await stories.list_page(principal, limit, cursor)
    return StoryList(
        items=[StoryOut.of(s) for s in page.items],
        next_cursor=page.next_cursor.encode() if page.next_cursor else None,
    )


@router.get("/recommendations", response_model=Recommendations, responses={422: _PROBLEM})
async def recommendations(
    stories: StoryServiceDep,
    principal: PrincipalDep,
    age: Annotated[int, Query(ge=2, le=12)],
    limit: Annotated[int, Query(ge=1, le=20)] = 5,
) -> Recommendations:
    found = await stories.recommend(principal, age, limit)
    return Recommendations(age=age, items=[StoryOut.of(s) for s in found])
