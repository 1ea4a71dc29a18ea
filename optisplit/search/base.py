"""The search extension point: one small base class every engine implements, and its result."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from optisplit.cost import CostModel, Evaluation

__all__ = ["Engine", "SearchResult"]


@dataclass
class SearchResult:
    """What a search found.

    Attributes:
        engine: the engine's registry name.
        front: the feasible Pareto front (``optisplit.pareto.pareto_front`` order: latency
            ascending).
        evaluations: how many plans the engine evaluated (or, for ``exact``, how many partial
            plans its dynamic program kept).
        seconds: wall-clock time of the search.
    """

    engine: str
    front: list[Evaluation] = field(default_factory=list)
    evaluations: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "engine": self.engine,
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "front": [e.to_dict() for e in self.front],
        }


class Engine(abc.ABC):
    """A search engine over the split plans of one cost model.

    Lifecycle: construct with the engine's own options (no arguments needed), then call
    ``run`` once per model; ``run`` may be called again with another model or seed. Invariants:
    the returned front holds feasible plans only, none dominated by another evaluated plan;
    ``on_evaluate`` sees each plan the engine evaluates, once; the same ``seed`` gives the same
    front.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def run(
        self,
        model: CostModel,
        *,
        budget: int | None = None,
        seed: int = 0,
        on_evaluate: Callable[[Evaluation], None] | None = None,
    ) -> SearchResult:
        """Search the plans of ``model``.

        Args:
            model: the cost model (chain, testbed, profiles).
            budget: the number of plan evaluations allowed; ``None`` = the engine's default.
            seed: seed of any randomness.
            on_evaluate: called with every evaluated plan (to record it in a study).

        Returns:
            The front found, the number of evaluations and the time taken.
        """
