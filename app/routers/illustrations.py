"""`GET /v1/stories/{id}/illustration` (the owner's picture) and `DELETE /v1/stories/{id}`.

The picture is served from this service's object store, never from the image
model's (expiring) URL: `200` with its `Content-Type`, an `ETag` (its SHA-256)
and `Cache-Control: private`, `304` for a matching `If-None-Match`; with
`OBJECT_STORE_SERVE=redirect`, `307` to a short-lived signed URL of the bucket.
`202` with `Retry-After` while it is being drawn; `404` for another owner's
story (as `GET /v1/stories/{id}`), no picture, or one that failed.
Deleting a story deletes its picture.
"""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Header, Response, status
from fastapi.responses import JSONResponse

from app.dependencies import PrincipalDep, RateLimitedRoute, StoryServiceDep
from app.http.openapi import problem_responses

router = APIRouter(prefix="/v1", tags=["stories"], route_class=RateLimitedRoute)

# A ready picture never changes; `private`: only the owner's own client may keep it,
# and `Vary` keeps one account's copy from another's on a shared device.
CACHE_CONTROL = "private, max-age=86400"

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_IMAGE_TYPES = ("image/webp", "image/png", "image/jpeg", "image/gif")
_STRING = {"schema": {"type": "string"}}
_PICTURE_HEADERS = {
    "ETag": {"description": "The picture's SHA-256, quoted.", **_STRING},
    "Cache-Control": {"description": "`private, max-age=86400`.", **_STRING},
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The picture, as stored (its type read from its bytes).",
        "content": {kind: _BINARY for kind in _IMAGE_TYPES},
        "headers": _PICTURE_HEADERS,
    },
    202: {
        "description": "Being drawn: ask again after `Retry-After` seconds.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {"status": {"type": "string", "enum": ["pending"]}},
                },
                "example": {"status": "pending"},
            }
        },
        "headers": {
            "Retry-After": {"description": "Seconds to wait.", "required": True, **_STRING}
        },
    },
    304: {"description": "Not modified (`If-None-Match`).", "headers": _PICTURE_HEADERS},
    307: {
        "description": "`OBJECT_STORE_SERVE=redirect`: a short-lived signed URL of the bucket.",
        "headers": {"Location": {"description": "The signed URL.", "required": True, **_STRING}},
    },
    **problem_responses(404),
}


@router.get(
    "/stories/{story_id}/illustration",
    response_class=Response,
    responses=_RESPONSES,
)
async def get_illustration(
    story_id: UUID,
    stories: StoryServiceDep,
    principal: PrincipalDep,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match", max_length=1024)] = None,
) -> Response:
    reply = await stories.picture(principal, story_id, if_none_match)
    if reply.status == "pending":
        return JSONResponse(
            {"status": "pending"},
            status_code=status.HTTP_202_ACCEPTED,
            headers={"Retry-After": str(reply.retry_after), "Cache-Control": "no-store"},
        )
    headers = {"Cache-Control": CACHE_CONTROL, "Vary": "Authorization"}
    if reply.etag is not None:
        headers["ETag"] = reply.etag
    if reply.status == "not_modified":
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    if reply.redirect_url is not None:
        return Response(
            status_code=status.HTTP_307_TEMPORARY_REDIRECT,
            headers={"Location": reply.redirect_url, "Cache-Control": "private, no-store"},
        )
    return Response(content=reply.data, media_type=reply.media_type, headers=headers)


@router.delete(
    "/stories/{story_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=problem_responses(404),
)
async def delete_story(story_id: UUID, stories: StoryServiceDep, principal: PrincipalDep) -> None:
    await stories.delete(principal, story_id)
