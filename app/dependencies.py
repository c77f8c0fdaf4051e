"""Tiny getters of the lifespan state, with `Annotated` aliases for routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.lifespan import AppState
from app.services.stories import StoryService


def get_app_state(request: Request) -> AppState:
    state: AppState = request.state.app_state
    return state


def get_story_service(request: Request) -> StoryService:
    return get_app_state(request).stories


def get_principal(request: Request) -> str:
    """Who is asking. One anonymous principal until authentication lands."""
    return get_app_state(request).settings.anonymous_principal


AppStateDep = Annotated[AppState, Depends(get_app_state)]
StoryServiceDep = Annotated[StoryService, Depends(get_story_service)]
PrincipalDep = Annotated[str, Depends(get_principal)]
