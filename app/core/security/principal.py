"""The principal (who is asking) and how a request is mapped to one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from starlette.requests import Request


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: `id` owns the stories it creates, and keys its rate limits
    when `authenticated` (an anonymous caller is keyed by its address)."""

    id: str
    authenticated: bool


class Authenticator(Protocol):
    def authenticate(self, request: Request) -> Principal: ...


class AnonymousAuthenticator:
    """Every request is the same anonymous principal (no authentication configured)."""

    def __init__(self, principal_id: str = "anonymous") -> None:
        self.principal = Principal(principal_id, authenticated=False)

    def authenticate(self, request: Request) -> Principal:
        return self.principal
