"""optisplit: where to split a DNN across edge devices, predicted and measured.

The public API is re-exported here lazily (heavy modules such as torch load on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module that defines it. Add new public names here; __all__ is derived and sorted.
_EXPORTS: dict[str, str] = {
    "Backend": "optisplit.runtime.base",
    "BlockInfo": "optisplit.chain",
    "BlockProfile": "optisplit.profile",
    "BlockTiming": "optisplit.profile",
    "Calibration": "optisplit.calibrate",
    "CONDITIONS": "optisplit.testbed",
    "Chain": "optisplit.chain",
    "CheckReport": "optisplit.emulate.checks",
    "Comparison": "optisplit.compare",
    "CostModel": "optisplit.cost",
    "CutInfo": "optisplit.chain",
    "DemoResult": "optisplit.demo",
    "Deployment": "optisplit.runtime.base",
    "Device": "optisplit.testbed",
    "Engine": "optisplit.search",
    "Evaluation": "optisplit.cost",
    "ExactEngine": "optisplit.search",
    "InProcessBackend": "optisplit.runtime.inprocess",
    "InvalidPlanError": "optisplit.errors",
    "Link": "optisplit.testbed",
    "LinkMeasurement": "optisplit.probe",
    "LocalWorkers": "optisplit.runtime.launcher",
    "ModelError": "optisplit.errors",
    "ModelSpec": "optisplit.runtime.base",
    "NSGA2Engine": "optisplit.search",
    "OptisplitError": "optisplit.errors",
    "OptunaEngine": "optisplit.search",
    "Overheads": "optisplit.cost",
    "Plan": "optisplit.plan",
    "PlanComparison": "optisplit.compare",
    "ProbeError": "optisplit.probe",
    "ProfileError": "optisplit.errors",
    "RpcBackend": "optisplit.runtime.rpc_backend",
    "RuntimeFailure": "optisplit.errors",
    "SearchError": "optisplit.errors",
    "SearchResult": "optisplit.search",
    "SocketBackend": "optisplit.runtime.socket_backend",
    "Stage": "optisplit.plan",
    "StageCost": "optisplit.cost",
    "StagePlacement": "optisplit.runtime.base",
    "StudyError": "optisplit.errors",
    "Sweep": "optisplit.sweep",
    "TensorInfo": "optisplit.chain",
    "Testbed": "optisplit.testbed",
    "TestbedError": "optisplit.errors",
    "TraceError": "optisplit.errors",
    "Transfer": "optisplit.cost",
    "UsageError": "optisplit.errors",
    "Worker": "optisplit.runtime.worker",
    "apply_condition": "optisplit.testbed",
    "apply_link_measurements": "optisplit.probe",
    "build_model": "optisplit.zoo",
    "calibrate_overheads": "optisplit.calibrate",
    "check_testbed": "optisplit.emulate",
    "compare_plans": "optisplit.compare",
    "compare_study": "optisplit.compare",
    "example_input": "optisplit.zoo",
    "get_engine": "optisplit.search",
    "hypervolume": "optisplit.pareto",
    "input_size": "optisplit.zoo",
    "list_models": "optisplit.zoo",
    "load_chain": "optisplit.chain",
    "load_cost_model": "optisplit.cost",
    "load_profile": "optisplit.profile",
    "load_testbed": "optisplit.testbed",
    "pareto_front": "optisplit.pareto",
    "probe_link": "optisplit.probe",
    "profile_chain": "optisplit.profiler",
    "profile_model": "optisplit.profiler",
    "profile_module": "optisplit.profiler",
    "reference_point": "optisplit.pareto",
    "run_demo": "optisplit.demo",
    "run_sweep": "optisplit.sweep",
    "save_profile": "optisplit.profile",
    "serve_probe_connection": "optisplit.probe",
    "trace": "optisplit.chain",
    "validate_plans": "optisplit.validate",
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
