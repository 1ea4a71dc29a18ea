"""optisplit: where to split a DNN across edge devices, predicted and measured.

The public API is re-exported here lazily (heavy modules such as torch load on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module that defines it. Add new public names here; __all__ is derived and sorted.
_EXPORTS: dict[str, str] = {
    "BlockInfo": "optisplit.chain",
    "BlockProfile": "optisplit.profile",
    "BlockTiming": "optisplit.profile",
    "Chain": "optisplit.chain",
    "CutInfo": "optisplit.chain",
    "InvalidPlanError": "optisplit.errors",
    "ModelError": "optisplit.errors",
    "OptisplitError": "optisplit.errors",
    "Plan": "optisplit.plan",
    "ProfileError": "optisplit.errors",
    "RuntimeFailure": "optisplit.errors",
    "SearchError": "optisplit.errors",
    "Stage": "optisplit.plan",
    "StudyError": "optisplit.errors",
    "TensorInfo": "optisplit.chain",
    "TestbedError": "optisplit.errors",
    "TraceError": "optisplit.errors",
    "UsageError": "optisplit.errors",
    "build_model": "optisplit.zoo",
    "example_input": "optisplit.zoo",
    "input_size": "optisplit.zoo",
    "list_models": "optisplit.zoo",
    "load_chain": "optisplit.chain",
    "load_profile": "optisplit.profile",
    "profile_chain": "optisplit.profiler",
    "profile_model": "optisplit.profiler",
    "profile_module": "optisplit.profiler",
    "save_profile": "optisplit.profile",
    "trace": "optisplit.chain",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'optisplit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
