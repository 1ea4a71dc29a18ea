"""What the calibration probe misses: the runtime's cost per request of zoo models against probes.

``optisplit calibrate`` reads the runtime's per-request costs from a small convolutional probe
(12 KiB input). This script deploys whole models on the testbed's second device, the source
relaying their input and output, and reads what the runtime spends per request beside the
model's compute, for models of about the same compute:

- ``plain``: the calibration probe with 32 layers and without its squeeze-and-excitation gates
  (12 KiB in, 40 bytes out; 4.4 MiB of weights), as the probe was before it had them;
- ``probe``: the calibration probe with 32 layers (36 MiB of weights: as many megabytes per
  request as a zoo model);
- ``probe_wide_io``: ``probe`` behind a 7x7, stride-7 convolution of a 224 x 224 image and with
  a head of 1000 classes (588 KiB in, 4 KiB out, as the zoo models);
- ``wide``: calibration's wide probe (``optisplit.calibrate.wide_probe_model``: 588 KiB in, 40
  bytes out, 4 layers), from whose hand-offs it reads ``handoff_ms_per_mb``;
- the zoo models of ``--models`` (default ``mobilenet_v2``).

Per model and backend (medians over ``--rounds``, the models taking turns): the period
(``1000 / throughput``), the stage's compute with one request in flight (``alone``), the
device's period beyond it (``excess``: the runtime's own work while requests stream, as the
cost model counts it in ``request_ms``), the device's CPU per request beyond ``alone``
(``cpu excess``), the source's relay CPU, the delay forwarder's and the client's (what the
helper cores' busy time leaves after the other two), and the client's two local hand-offs
(``handoff in``: the input to the source; ``handoff out``: the output from the sink), which the
cost model predicts as ``handoff_ms + handoff_ms_per_mb * MB`` each.

With ``--split F`` (0 < F < 1) each model is split instead: the source runs its first ``F`` of
the blocks and the second device the rest (``source[0:c] -> other[c:B]``), as calibration's
split plan does. The source is the paced device whose core the client and the delay forwarder
share: its stage computes there while they work. Per model and backend: the period, each
stage's compute with one request in flight (``src alone``, ``dst alone``) and while requests
stream (``src stream``, ``dst stream``: a stage that shares its core, or the host's caches,
with work that streams beside it computes slower), the hop to the second device and the hop
back (``hop in``, ``hop back``: their time as the runtime measures it, wire time included),
the period beyond the slower stage's streaming compute (``excess``), the forwarder's and the
client's CPU per request.

Run with the testbed up under ``lan`` (``optisplit testbed up local --condition lan``):
``.venv/bin/python bench/probe_gap.py [--testbed local] [--models mobilenet_v2] [--rounds 3]
[--backends socket,rpc] [--split F]``; prints a table and writes
``bench/results/probe_gap.json`` (``probe_gap-split.json`` with ``--split``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not bench/: its scripts would shadow modules (profile)

PROBES = {
    "plain": "bench.probe_gap:plain",
    "probe": "bench.probe_gap:probe",
    "probe_wide_io": "bench.probe_gap:wide_io",
    "wide": "optisplit.calibrate:wide_probe_model",
}


def plain() -> Any:
    """The calibration probe with 32 layers, without its gates (a model factory)."""
    from optisplit.calibrate import probe_model

    return probe_model(layers=32, hidden=0)


def probe() -> Any:
    """The calibration probe with 32 layers (a model factory for the workers)."""
    from optisplit.calibrate import probe_model

    return probe_model(layers=32)


def wide_io() -> Any:
    """:func:`probe` behind a 7x7, stride-7 convolution of a 3 x 224 x 224 input and with a head
    of 1000 classes: a zoo model's input and output bytes."""
    from torch import nn, randn

    body, _ = probe()
    first = body[0][0]
    body[0][0] = nn.Conv2d(3, first.out_channels, 7, stride=7)
    body[-1][-1] = nn.Linear(body[-1][-1].in_features, 1000)
    return body, randn(1, 3, 224, 224)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", default="local")
    parser.add_argument("--models", default="mobilenet_v2", help="zoo models, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", default="socket,rpc")
    parser.add_argument(
        "--split",
        type=float,
        default=0.0,
        help="split each model: the source runs this fraction of its blocks (default 0: whole)",
    )
    parser.add_argument("--out", help="JSON path (default bench/results/probe_gap[-split].json)")
    args = parser.parse_args()
    if not 0.0 <= args.split < 1.0:
        print(f"--split: expected a fraction in [0, 1), got {args.split}")
        return 2
    name = "probe_gap-split.json" if args.split else "probe_gap.json"
    out = Path(args.out or ROOT / "bench" / "results" / name)

    from optisplit import emulate
    from optisplit.chain import load_chain
    from optisplit.errors import OptisplitError
    from optisplit.testbed import load_testbed

    models = [*PROBES, *args.models.split(",")]
    try:  # traced once here: an unknown model is refused before anything is deployed
        inputs = {m: load_chain(m, module=PROBES.get(m)).input_bytes for m in models}
    except OptisplitError as exc:
        print(f"--models: {exc}")
        return 2
    testbed = load_testbed(args.testbed)
    if not emulate.is_up(testbed):
        print(f"testbed {testbed.name} is not up: optisplit testbed up {testbed.name}")
        return 2
    rows = []
    for backend in args.backends.split(","):
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in models}
        for _ in range(args.rounds):  # the models take turns: a slow spell spreads over all
            for model in models:
                runs[model].append(_run(testbed, backend, model, args.split))
        for model in models:
            row: dict[str, Any] = {
                "backend": backend,
                "model": model,
                "input_kib": inputs[model] / 1024,
            }
            row.update({k: statistics.median(r[k] for r in runs[model]) for k in runs[model][0]})
            row["runs"] = runs[model]
            rows.append(row)
    keys = SPLIT_KEYS if args.split else WHOLE_KEYS
    head = f"{'backend':8}{'model':18}" + "".join(f"{k.replace('_', ' '):>14}" for k in keys)
    print(head)
    print("-" * len(head))
    for row in rows:
        print(f"{row['backend']:8}{row['model']:18}" + "".join(f"{row[k]:14.2f}" for k in keys))
    doc = {"testbed": testbed.name, "rounds": args.rounds, "split": args.split, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


WHOLE_KEYS = (
    "input_kib",
    "period_ms",
    "alone_ms",
    "excess_ms",
    "cpu_excess_ms",
    "relay_ms",
    "forwarder_ms",
    "client_ms",
    "handoff_in_ms",
    "handoff_out_ms",
)
SPLIT_KEYS = (
    "period_ms",
    "src_alone_ms",
    "src_stream_ms",
    "dst_alone_ms",
    "dst_stream_ms",
    "hop_in_ms",
    "hop_back_ms",
    "excess_ms",
    "forwarder_ms",
    "client_ms",
    "handoff_in_ms",
    "handoff_out_ms",
)


def _run(testbed: Any, backend: str, model: str, split: float) -> dict[str, float]:
    """Deploy ``model`` on the testbed once (whole on its second device, or split at ``split``
    of its blocks); its costs per request."""
    from bench.wakeups import deploy_probe_plan, helper_figures

    measured = deploy_probe_plan(
        testbed, backend, model, PROBES.get(model), warmup=4, window_s=3.0, split=split
    )
    period = 1000.0 / measured["throughput_rps"]
    figures = helper_figures(testbed, measured)
    helpers = {
        "forwarder_ms": figures["forwarder_ms"],
        "client_ms": figures["client_ms"],
        # the first and last transfers: the client's local hand-offs at the source and sink
        "handoff_in_ms": measured["transfers"][0]["ms"],
        "handoff_out_ms": measured["transfers"][-1]["ms"],
    }
    if split:
        src, dst = measured["stages"]
        # the transfers: the hand-off at the source, the cut, the output back, the hand-off
        hop_in, hop_back = (t["ms"] for t in measured["transfers"] if t["src"] != t["dst"])
        return {
            "period_ms": period,
            "src_alone_ms": src["compute_ms"],
            "src_stream_ms": src["streaming_compute_ms"],
            "dst_alone_ms": dst["compute_ms"],
            "dst_stream_ms": dst["streaming_compute_ms"],
            "hop_in_ms": hop_in,
            "hop_back_ms": hop_back,
            "excess_ms": period - max(src["streaming_compute_ms"], dst["streaming_compute_ms"]),
            **helpers,
        }
    (stage,) = measured["stages"]
    other = stage["device"]
    return {
        "period_ms": period,
        "alone_ms": stage["compute_ms"],
        "excess_ms": period - stage["compute_ms"],
        "cpu_excess_ms": measured["host"]["devices_ms"][other] - stage["compute_ms"],
        "relay_ms": figures["relay_ms"],
        **helpers,
    }


if __name__ == "__main__":
    sys.exit(main())
