"""Search engines behind one base class; ``ENGINES`` maps registry names to engine classes."""

from __future__ import annotations

from optisplit.errors import UsageError
from optisplit.search.base import Engine, SearchResult
from optisplit.search.exact import ExactEngine
from optisplit.search.nsga2 import NSGA2Engine
from optisplit.search.optuna_engine import OptunaEngine

__all__ = [
    "ENGINES",
    "Engine",
    "ExactEngine",
    "NSGA2Engine",
    "OptunaEngine",
    "SearchResult",
    "get_engine",
]

ENGINES: dict[str, type[Engine]] = {
    "exact": ExactEngine,
    "nsga2": NSGA2Engine,
    "optuna": OptunaEngine,
}


def get_engine(name: str) -> type[Engine]:
    """The engine class registered as ``name``.

    Raises:
        UsageError: an unknown name, listing the valid ones.
    """
    try:
        return ENGINES[name]
    except KeyError:
        raise UsageError(
            f"unknown search engine {name!r}; choose one of {', '.join(sorted(ENGINES))}"
        ) from None
