"""Token routing (SPEC section 3): which questions are code, long or hard, and each one's answer budget.

Decided once per request in the API process (``route_all``: the balancing of several workers needs the budgets)
and carried to the engine worker in the ``wire.Ask`` frame, which formats and post-processes by it.  Pure Python,
no engine or web imports: the service and the measurement tools share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from service.settings import Settings

HARD_CODE_SIGNALS = ("kernel<<<", "global void", "__global__", "#include")
LONG_ANSWER_SIGNALS = ("算子", "spmv", "convnets", "im2col", "gemm", "tensor cores", "triton", "tilelang")
CODE_SIGNALS = ("代码", "伪代码", "核心代码", "代码片段", "import ", "def ", *HARD_CODE_SIGNALS)


class Route(StrEnum):
    """Where token routing sends a question (its answer budget and post-processing)."""

    SHORT = "short"
    CODE = "code"
    LONG = "long"
    HARD = "hard"


def _unique(keywords: tuple[str, ...]) -> tuple[str, ...]:
    """Lower-cased keywords without repeats (a keyword listed twice still counts once)."""
    return tuple(dict.fromkeys(k.lower() for k in keywords if k))


def _hits(text: str, keywords: tuple[str, ...]) -> int:
    """How many of ``keywords`` occur in ``text`` (``text`` already lower-case), each counted once."""
    return sum(1 for k in keywords if k and k.lower() in text)


@dataclass(frozen=True, slots=True)
class Router:
    """Classifies questions; built once from the settings."""

    hard: tuple[str, ...]
    long: tuple[str, ...]
    code: tuple[str, ...]
    hard_min: int
    long_min: int

    @classmethod
    def from_settings(cls, s: Settings) -> Router:
        long = (LONG_ANSWER_SIGNALS if s.long_answer_enable_default else ()) + s.long_answer_keywords
        hard = HARD_CODE_SIGNALS + s.hard_code_question_keywords
        return cls(
            hard=_unique(hard),
            long=_unique(long),
            code=_unique(CODE_SIGNALS + s.code_question_keywords + s.hard_code_question_keywords),
            hard_min=s.hard_code_min_hits,
            long_min=s.long_answer_min_hits,
        )

    def route(self, question: str) -> Route:
        text = question.lower()
        if _hits(text, self.hard) >= self.hard_min:
            return Route.HARD
        if self.long and _hits(text, self.long) >= self.long_min:
            return Route.LONG
        if _hits(text, self.code) >= 1:
            return Route.CODE
        return Route.SHORT

    def is_code(self, question: str) -> bool:
        return _hits(question.lower(), self.code) >= 1


def budget(s: Settings, route: Route) -> int:
    """Answer budget (max new tokens) of a route; MAX_NEW_TOKENS for everything when routing is off."""
    if s.disable_token_routing:
        return s.max_new_tokens
    return {
        Route.HARD: s.max_new_tokens_code_hard,
        Route.LONG: s.max_new_tokens_code,
        Route.CODE: s.max_new_tokens_code_soft,
        Route.SHORT: s.max_new_tokens,
    }[route]


def is_short_answer(s: Settings, route: str) -> bool:
    """Short-answer questions get post-processing: all of them when routing is off."""
    return s.disable_token_routing or route == Route.SHORT


@dataclass(frozen=True, slots=True)
class Routed:
    """Each question's route and answer budget (max new tokens), in the request's order."""

    routes: list[str]
    budgets: list[int]

    def take(self, indices: Sequence[int]) -> Routed:
        """The routes and budgets of the questions at ``indices`` (one worker's shard)."""
        return Routed([self.routes[i] for i in indices], [self.budgets[i] for i in indices])


def route_all(s: Settings, router: Router, questions: Sequence[str], max_tokens: int | None = None) -> Routed:
    """Route every question; its budget is ``max_tokens`` when the request gives one, else its route's."""
    routes = [router.route(q) for q in questions]
    if max_tokens is not None:
        return Routed(list(map(str, routes)), [max_tokens] * len(routes))
    budgets = {route: budget(s, route) for route in Route}
    return Routed(list(map(str, routes)), [budgets[route] for route in routes])
