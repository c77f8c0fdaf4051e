"""Child-safe content: which check decides, and what a verdict does to the request.

Every prompt is checked before any story model sees it, and every story an
upstream wrote before it is stored, cached or returned (docs/security.md,
"Child-safe content"):

- `MODERATION_MODE=openai` (the default): OpenAI's moderation endpoint decides,
  through its guard (breaker `openai:moderation`, the shared retry policy and the
  `openai` bulkhead) and within a budget of its own (`check_seconds`, at most
  `MODERATION_TIMEOUT_SECONDS` and `MODERATION_DEADLINE_SHARE` of the request's
  deadline). When it cannot answer (no key, breaker open, timeout, 5xx, an
  unusable reply), `MODERATION_ON_UNAVAILABLE` says what happens: `local` (the
  default) lets the local word list decide; `refuse` answers 503 for a prompt
  and drops an upstream story (the next rung serves).
- `MODERATION_MODE=local`: the local word list decides, with no remote call.

A flagged prompt is a 422 naming `prompt` (nothing of the text is echoed, no
category is named). A flagged story is dropped and the next rung serves.
Every check is logged (without the text) and counted
(`story_moderation_total{where, verdict, checker}`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from app.core.resilience import DeadlineExceededError, ResilienceError, current_deadline
from app.errors import InvalidRequestError, ServiceUnavailableError
from app.platform.config import Settings
from app.providers.base import (
    ContentModerator,
    GeneratedStory,
    ModerationVerdict,
    ProviderError,
    StoryRequest,
)
from app.providers.moderation import LocalModerator
from app.services.ladder import LadderBudget

logger = logging.getLogger(__name__)

Where = Literal["prompt", "story"]
#: (where, verdict, checker): `app.platform.metrics.record_moderation`.
RecordCheck = Callable[[str, str, str], None]

PROMPT_REFUSED = (
    "This story idea isn't suitable for a children's story. Please choose a different idea."
)
CANNOT_CHECK = "Story ideas can't be checked right now. Please try again in a little while."


def _ignore(where: str, verdict: str, checker: str) -> None:
    return None


class UnsuitablePromptError(InvalidRequestError):
    """A prompt the content check flagged: 422, naming the field and nothing of the text."""

    title = "Story idea not suitable"
    slug = "unsuitable-prompt"

    def __init__(self) -> None:
        super().__init__(
            PROMPT_REFUSED,
            errors=[{"field": "prompt", "reason": "not suitable for a children's story"}],
        )


@dataclass(frozen=True, slots=True)
class ContentCheck:
    """The outcome of checking one prompt or story."""

    where: Where
    verdict: Literal["passed", "flagged", "unavailable"]
    checker: Literal["openai", "local", "none"]
    categories: tuple[str, ...] = ()
    # Unavailable: when the remote check may answer again, if it said.
    retry_after: float | None = None

    @property
    def passed(self) -> bool:
        return self.verdict == "passed"


@dataclass(frozen=True, slots=True)
class ModerationPolicy:
    mode: Literal["openai", "local"] = "openai"
    on_unavailable: Literal["local", "refuse"] = "local"
    # The most one remote check may take.
    check_seconds: float = 2.0

    def __post_init__(self) -> None:
        if self.check_seconds <= 0:
            raise ValueError("check_seconds must be > 0")


def story_text(story: GeneratedStory) -> str:
    return "\n\n".join([story.title, *story.paragraphs])


class ModerationService:
    """Checks prompts and stories; see the module's docstring for the policy."""

    def __init__(
        self,
        remote: ContentModerator | None = None,
        *,
        local: LocalModerator | None = None,
        policy: ModerationPolicy | None = None,
        record: RecordCheck = _ignore,
        budget: LadderBudget | None = None,
    ) -> None:
        self.policy = policy or ModerationPolicy()
        self._remote = remote if self.policy.mode == "openai" else None
        self._local = local or LocalModerator()
        self._record = record
        self._budget = budget or LadderBudget()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        remote: ContentModerator | None,
        *,
        record: RecordCheck = _ignore,
        budget: LadderBudget | None = None,
    ) -> ModerationService:
        cfg = settings.moderation
        if cfg.mode == "openai" and remote is None:
            logger.warning(
                "MODERATION_MODE=openai without OPENAI_API_KEY: every check is %s",
                "the local word list" if cfg.on_unavailable == "local" else "refused (503)",
            )
        return cls(
            remote,
            policy=ModerationPolicy(
                mode=cfg.mode,
                on_unavailable=cfg.on_unavailable,
                check_seconds=cfg.check_seconds(settings.request_deadline_seconds),
            ),
            record=record,
            budget=budget,
        )

    @property
    def reserve_seconds(self) -> float:
        """Time the upstream story rungs leave for checking their story."""
        return self.policy.check_seconds if self._remote is not None else 0.0

    async def check_prompt(self, request: StoryRequest) -> ContentCheck:
        """Passes, or raises: `UnsuitablePromptError` (flagged) or, with
        `MODERATION_ON_UNAVAILABLE=refuse`, `ServiceUnavailableError`."""
        check = await self._check("prompt", request.prompt, request.language)
        if check.verdict == "flagged":
            raise UnsuitablePromptError()
        if check.verdict == "unavailable":
            raise ServiceUnavailableError(CANNOT_CHECK, retry_after=check.retry_after or 5.0)
        return check

    async def check_story(self, request: StoryRequest, story: GeneratedStory) -> ContentCheck:
        """The verdict on an upstream's story; only a `passed` one may be served."""
        return await self._check("story", story_text(story), request.language)

    async def _check(self, where: Where, text: str, language: str) -> ContentCheck:
        verdict: ModerationVerdict | Exception | None = None
        if self._remote is not None:
            verdict = await self._ask_remote(where, text)
        local_decides = self.policy.mode == "local" or self.policy.on_unavailable == "local"
        if not isinstance(verdict, ModerationVerdict) and local_decides:
            verdict = self._local.check(text, language)
        if isinstance(verdict, ModerationVerdict):
            outcome: Literal["passed", "flagged"] = "flagged" if verdict.flagged else "passed"
            check = ContentCheck(where, outcome, _checker(verdict), verdict.categories)
        else:
            wait = getattr(verdict, "retry_after", None)
            check = ContentCheck(
                where,
                "unavailable",
                "none",
                retry_after=float(wait) if isinstance(wait, int | float) and wait > 0 else None,
            )
        self._report(check)
        return check

    async def _ask_remote(self, where: Where, text: str) -> ModerationVerdict | Exception:
        """OpenAI's verdict, or why it could not answer within the check's budget."""
        assert self._remote is not None
        remote = self._remote
        deadline = current_deadline()
        seconds = self.policy.check_seconds
        if deadline is not None:
            seconds = min(seconds, deadline.remaining())
        try:
            if seconds <= 0:
                raise DeadlineExceededError("no time left for a content check")
            return await self._budget.run(seconds, lambda: remote.moderate(text))
        except (ProviderError, ResilienceError) as error:
            logger.warning(
                "moderation unavailable",
                extra={
                    "where": where,
                    "error": str(error) or type(error).__name__,
                    "then": self.policy.on_unavailable,
                },
            )
            return error

    def _report(self, check: ContentCheck) -> None:
        self._record(check.where, check.verdict, check.checker)
        extra = {
            "where": check.where,
            "verdict": check.verdict,
            "checker": check.checker,
            "categories": list(check.categories),
        }
        if check.passed:
            logger.info("content check passed", extra=extra)
        else:
            logger.warning("content check did not pass", extra=extra)


def _checker(verdict: ModerationVerdict) -> Literal["openai", "local"]:
    return "local" if verdict.checker == "local" else "openai"
