"""Optuna storage and study conventions: one study per search, one trial per evaluated plan.

Default storage ``sqlite:///studies/optisplit.db``; any Optuna RDB URL works (PostgreSQL for
several search processes on several hosts). A study has directions (minimize ``latency_ms``,
maximize ``throughput_rps``) and the user attributes ``model, testbed, batch_size, granularity,
condition, profiles_root``. Every evaluated plan is a COMPLETE trial with values
``[latency_ms, throughput_rps]`` and the user attributes ``plan`` (text), ``engine``,
``latency_ms``, ``throughput_rps``, ``items_per_s``, ``memory_bytes``, ``feasible``, ``bound``
(what sets its throughput) and ``on_front``; the system attribute ``constraints`` (``[0.0]``
feasible, ``[1.0]`` not) lets optuna-dashboard mark infeasible plans. Validation adds
``measured_<backend>`` to the trials of the validated plan.

Trials are written in bulk, one transaction per batch: Optuna's ``add_trials`` costs several
milliseconds per trial, too slow for the thousands of plans one search evaluates.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import sqlalchemy
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState

from optisplit.errors import StudyError

if TYPE_CHECKING:
    from optisplit.cost import Evaluation

__all__ = [
    "DEFAULT_STORAGE",
    "DIRECTIONS",
    "STUDY_ATTRS",
    "create_study",
    "default_study_name",
    "front_trials",
    "list_studies",
    "load_study",
    "open_storage",
    "record_evaluations",
    "record_measurement",
    "storage_url",
    "trial_summary",
]

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///studies/optisplit.db"
DIRECTIONS = ("minimize", "maximize")
METRIC_NAMES = ("latency_ms", "throughput_rps")
STUDY_ATTRS = ("model", "testbed", "batch_size", "granularity", "condition", "profiles_root")
MEASURED_BACKENDS = ("socket", "rpc", "inprocess")
_BATCH = 2000
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+]*://")

optuna.logging.set_verbosity(optuna.logging.WARNING)


def storage_url(url: str | None) -> str:
    """The storage URL to use: ``url`` or the default."""
    return url or DEFAULT_STORAGE


def open_storage(url: str | None = None) -> BaseStorage:
    """Open (and create if needed) the Optuna RDB storage at ``url`` (default: the sqlite file).

    Raises:
        StudyError: the URL is malformed, names an unknown database driver, or cannot be opened.
    """
    text = storage_url(url)
    if not _URL.match(text):
        raise StudyError(
            f"malformed storage URL {text!r}; expected e.g. {DEFAULT_STORAGE} or "
            "postgresql://user:pass@host/db"
        )
    if text.startswith("sqlite:///"):
        path = text[len("sqlite:///") :]
        if path and path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StudyError(f"cannot create the folder of {path}: {exc.strerror}") from None
    try:
        return RDBStorage(text)
    except Exception as exc:  # sqlalchemy raises many unrelated types for a bad URL
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StudyError(f"cannot open storage {text!r}: {reason}") from None


def _storage(storage: str | BaseStorage | None) -> BaseStorage:
    if isinstance(storage, BaseStorage):
        return storage
    return open_storage(storage)


def default_study_name(
    model: str, testbed: str, engine: str, *, now: _dt.datetime | None = None
) -> str:
    """``<model>-<testbed>-<engine>-<UTC timestamp>``, e.g. ``resnet18-pi-gpu-nsga2-20260127T101500``."""
    stamp = (now or _dt.datetime.now(_dt.timezone.utc)).strftime("%Y%m%dT%H%M%S")
    return f"{model}-{testbed}-{engine}-{stamp}"


def create_study(
    name: str,
    storage: str | BaseStorage | None = None,
    *,
    attrs: Mapping[str, Any] | None = None,
    resume: bool = False,
) -> optuna.Study:
    """Create the study ``name`` (or, with ``resume``, open the existing one).

    Raises:
        StudyError: the study exists and ``resume`` is false, or it is missing with ``resume``,
            or its directions are not (minimize latency, maximize throughput).
    """
    store = _storage(storage)
    exists = name in {s.study_name for s in optuna.get_all_study_summaries(store)}
    if exists and not resume:
        raise StudyError(
            f"study {name!r} already exists in {_url_of(store)}; pass --resume to add to it, "
            "or choose another --study name"
        )
    if resume and not exists:
        raise StudyError(f"cannot resume study {name!r}: it is not in {_url_of(store)}")
    if exists:
        study = optuna.load_study(study_name=name, storage=store)
        wanted = [optuna.study.StudyDirection.MINIMIZE, optuna.study.StudyDirection.MAXIMIZE]
        if study.directions != wanted:
            raise StudyError(f"study {name!r} is not an optisplit study (other directions)")
    else:
        study = optuna.create_study(study_name=name, storage=store, directions=list(DIRECTIONS))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(METRIC_NAMES))
    for key, value in (attrs or {}).items():
        if key not in study.user_attrs:
            study.set_user_attr(key, value)
    return study


def load_study(name: str, storage: str | BaseStorage | None = None) -> optuna.Study:
    """Open an existing study.

    Raises:
        StudyError: no study of that name in the storage (the message lists a few that exist).
    """
    store = _storage(storage)
    try:
        return optuna.load_study(study_name=name, storage=store)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(store))
        known = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "") if names else "none"
        raise StudyError(
            f"no study named {name!r} in {_url_of(store)} (studies there: {known})"
        ) from None


def list_studies(storage: str | BaseStorage | None = None) -> list[dict[str, Any]]:
    """One summary per study: name, trials, created, and the optisplit study attributes."""
    store = _storage(storage)
    rows = []
    for summary in optuna.get_all_study_summaries(store, include_best_trial=False):
        start = summary.datetime_start
        rows.append(
            {
                "name": summary.study_name,
                "trials": summary.n_trials,
                "created": start.isoformat(timespec="seconds") if start else None,
                **{k: summary.user_attrs.get(k) for k in STUDY_ATTRS},
            }
        )
    return sorted(rows, key=lambda r: (r["created"] or "", r["name"]))


def record_evaluations(
    study: optuna.Study,
    evaluations: Sequence[Evaluation],
    *,
    engine: str,
    front: Iterable[str] = (),
) -> int:
    """Add one COMPLETE trial per evaluation, in bulk; returns the number of trials written.

    Args:
        study: an optisplit study (see ``create_study``).
        evaluations: the evaluated plans, in evaluation order.
        engine: the engine that evaluated them (user attribute ``engine``).
        front: the text of the plans on that engine's front (user attribute ``on_front``).
    """
    on_front = set(front)
    trials = [_trial(e, engine, str(e.plan) in on_front) for e in evaluations]
    rdb = _rdb_backend(study)
    for start in range(0, len(trials), _BATCH):
        batch = trials[start : start + _BATCH]
        if rdb is None:
            study.add_trials(batch)
        else:
            _bulk_insert(rdb, study._study_id, batch)
    return len(trials)


def _trial(evaluation: Evaluation, engine: str, on_front: bool) -> FrozenTrial:
    attrs = {
        "plan": str(evaluation.plan),
        "engine": engine,
        "latency_ms": evaluation.latency_ms,
        "throughput_rps": evaluation.throughput_rps,
        "items_per_s": evaluation.items_per_s,
        "memory_bytes": dict(evaluation.memory_bytes),
        "feasible": bool(evaluation.feasible),
        "bound": evaluation.bound,
        "on_front": on_front,
    }
    return optuna.trial.create_trial(
        values=[float(evaluation.latency_ms), float(evaluation.throughput_rps)],
        user_attrs=attrs,
        system_attrs={"constraints": [0.0 if evaluation.feasible else 1.0]},
    )


def _rdb_backend(study: optuna.Study) -> RDBStorage | None:
    storage: Any = study._storage
    storage = getattr(storage, "_backend", storage)
    return storage if isinstance(storage, RDBStorage) else None


def _bulk_insert(rdb: RDBStorage, study_id: int, trials: Sequence[FrozenTrial]) -> None:
    """Insert finished trials in one transaction (rows as Optuna's own models define them)."""
    from optuna.storages._rdb import models

    session = rdb.scoped_session()
    try:
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        number = session.query(models.TrialModel).filter_by(study_id=study_id).count()
        rows = []
        for offset, trial in enumerate(trials):
            row = models.TrialModel(
                study_id=study_id,
                number=number + offset,
                state=trial.state,
                datetime_start=trial.datetime_start,
                datetime_complete=trial.datetime_complete,
            )
            rows.append(row)
        session.add_all(rows)
        session.flush()
        values: list[dict[str, Any]] = []
        user: list[dict[str, Any]] = []
        system: list[dict[str, Any]] = []
        for row, trial in zip(rows, trials):
            for objective, value in enumerate(trial.values or ()):
                stored, kind = models.TrialValueModel.value_to_stored_repr(value)
                values.append(
                    {
                        "trial_id": row.trial_id,
                        "objective": objective,
                        "value": stored,
                        "value_type": kind,
                    }
                )
            for key, attr in trial.user_attrs.items():
                user.append({"trial_id": row.trial_id, "key": key, "value_json": json.dumps(attr)})
            for key, attr in trial.system_attrs.items():
                system.append(
                    {"trial_id": row.trial_id, "key": key, "value_json": json.dumps(attr)}
                )
        for model, batch in (
            (models.TrialValueModel, values),
            (models.TrialUserAttributeModel, user),
            (models.TrialSystemAttributeModel, system),
        ):
            if batch:
                session.execute(sqlalchemy.insert(model.__table__), batch)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def front_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The trials marked ``on_front``, one per plan, non-dominated among themselves.

    After ``--resume`` a study holds several searches' fronts; the filter keeps the combined
    front. Sorted by latency.
    """
    marked = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("on_front") and t.user_attrs.get("feasible", True)
    ]
    by_plan: dict[str, FrozenTrial] = {}
    for trial in marked:
        by_plan.setdefault(str(trial.user_attrs.get("plan")), trial)
    unique = list(by_plan.values())
    kept = [t for t in unique if not any(_dominates(o, t) for o in unique if o is not t)]
    return sorted(kept, key=lambda t: (t.values[0], -t.values[1]))


def _dominates(a: FrozenTrial, b: FrozenTrial) -> bool:
    lat_a, tp_a = a.values
    lat_b, tp_b = b.values
    return bool(lat_a <= lat_b and tp_a >= tp_b and (lat_a < lat_b or tp_a > tp_b))


def trial_summary(trial: FrozenTrial) -> dict[str, Any]:
    """The ``evaluate``-like object of a stored trial (plus engine and any measurements)."""
    attrs = trial.user_attrs
    out = {
        "plan": attrs.get("plan"),
        "latency_ms": attrs.get("latency_ms", trial.values[0] if trial.values else None),
        "throughput_rps": attrs.get("throughput_rps", trial.values[1] if trial.values else None),
        "items_per_s": attrs.get("items_per_s"),
        "memory_bytes": attrs.get("memory_bytes", {}),
        "feasible": attrs.get("feasible"),
        "engine": attrs.get("engine"),
        "trial": trial.number,
    }
    for key, value in attrs.items():
        if key.startswith("measured_"):
            out[key] = value
    return out


def record_measurement(
    study: optuna.Study, plan_text: str, backend: str, measured: Mapping[str, Any]
) -> None:
    """Attach ``measured_<backend>`` to every trial of the plan ``plan_text`` in ``study``.

    Finished trials are read-only through Optuna's API, so the attribute is written as a row of
    Optuna's ``trial_user_attributes`` table (RDB storages only).

    Raises:
        StudyError: unknown backend, the plan is not in the study, or the storage is not RDB.
    """
    if backend not in MEASURED_BACKENDS:
        raise StudyError(f"unknown backend {backend!r}; expected one of {MEASURED_BACKENDS}")
    plan_text = _normalised(plan_text)
    ids = [
        t._trial_id
        for t in study.get_trials(deepcopy=False)
        if _normalised(str(t.user_attrs.get("plan", ""))) == plan_text
    ]
    if not ids:
        raise StudyError(f"plan {plan_text!r} is not in study {study.study_name!r}")
    rdb = _rdb_backend(study)
    if rdb is None:
        raise StudyError("measurements can only be recorded in an RDB (SQL) storage")
    _upsert_user_attr(rdb, ids, f"measured_{backend}", dict(measured))


def _normalised(plan_text: str) -> str:
    from optisplit.plan import Plan

    try:
        return str(Plan.parse(plan_text))
    except ValueError:
        return plan_text.strip()


def _upsert_user_attr(rdb: RDBStorage, trial_ids: Sequence[int], key: str, value: Any) -> None:
    from optuna.storages._rdb import models

    session = rdb.scoped_session()
    try:
        model = models.TrialUserAttributeModel
        session.query(model).filter(model.trial_id.in_(list(trial_ids)), model.key == key).delete(
            synchronize_session=False
        )
        text = json.dumps(value, default=_json_default)
        session.add_all(model(trial_id=i, key=key, value_json=text) for i in trial_ids)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _url_of(storage: BaseStorage) -> str:
    backend: Any = getattr(storage, "_backend", storage)
    return str(getattr(backend, "url", type(backend).__name__))
