"""``optisplit calibrate``: measure a runtime backend's own costs on a testbed."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from optisplit.cli._common import (
    add_json_flag,
    add_window_flag,
    interrupt_on_sigterm,
    plan_progress,
    positive_int,
    print_json,
    print_table,
)

if TYPE_CHECKING:
    from optisplit.calibrate import Calibration

__all__ = ["register"]

_BACKENDS = ("socket", "rpc")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="measure a runtime backend's per-message and per-request costs on a testbed",
        description=(
            "Deploy a small probe model (a stack of gated 3x3 convolutions that reads as many "
            "megabytes per request as a zoo model) on the testbed, split across the source and "
            "another device and then whole on that device, and read what the runtime costs "
            "beyond compute and wire time: per message (message_ms), per hand-off at the "
            "source and sink (handoff_ms, and handoff_ms_per_mb per MB it carries, from a "
            "third probe with a zoo model's 224x224 input on the source alone), per stage for "
            "the hand-offs between its threads (queue_ms) and per request while requests stream "
            "(request_ms); on a testbed emulated on one host also the CPU time per request of "
            "the runtime on a device per stage (request_cpu_ms), of the client feeding it "
            "(client_ms) and of the delay forwarder per message "
            "(forward_ms) and per MB (forward_ms_per_mb), which share the host's cores with the "
            "devices, and, from a second, longer probe, the share of a core the client and "
            "forwarder (client wait %) and a device's worker (worker wait %) keep busy "
            "while requests stream. "
            "The result goes to PROFILES/overheads/TESTBED-BACKEND.json, where 'search', "
            "'evaluate', 'validate', 'sweep' and 'demo' pick it up for that backend. These costs "
            "drift with the host's load: calibrate close to the runs they are for. Needs fast "
            "links (the probe's transfers must not set its pace): calibrate emulated testbeds "
            "under 'lan'."
        ),
    )
    parser.add_argument("--testbed", required=True, help="testbed name or YAML file")
    parser.add_argument(
        "--backend",
        choices=(*_BACKENDS, "all"),
        default="socket",
        help="runtime to calibrate (default: %(default)s; all: each in turn)",
    )
    parser.add_argument(
        "--condition",
        default=None,
        help="the links' named condition (lan, wifi, constrained) as the testbed is up now",
    )
    parser.add_argument(
        "--requests",
        type=positive_int,
        default=40,
        help="measured requests per phase (default: %(default)s)",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=3,
        help="measure the probe plans this many times, taking turns (default: %(default)s)",
    )
    add_window_flag(parser)
    parser.add_argument(
        "--token-file",
        metavar="F",
        help="the workers' shared secret (testbeds with worker addresses)",
    )
    parser.add_argument(
        "--show",
        action="store_true",
        help="print the stored calibration instead of measuring",
    )
    parser.add_argument(
        "--profiles", default="profiles", help="profiles root (default: %(default)s)"
    )
    add_json_flag(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from optisplit.calibrate import calibrate_overheads, load_calibration, save_calibration
    from optisplit.errors import UsageError
    from optisplit.testbed import apply_condition, load_testbed

    backends = list(_BACKENDS) if args.backend == "all" else [args.backend]
    testbed = load_testbed(args.testbed, root=args.profiles)
    if args.show:
        found = {b: load_calibration(testbed.name, b, root=args.profiles) for b in backends}
        stored = [c for c in found.values() if c is not None]
        if not stored:
            raise UsageError(
                f"no calibration of {'/'.join(backends)} on testbed {testbed.name} under "
                f"{args.profiles}/overheads (measure one with 'optisplit calibrate --testbed "
                f"{testbed.name}')"
            )
        _report(args, [(c, None) for c in stored])
        return 0
    interrupt_on_sigterm()
    if args.condition:
        testbed = apply_condition(testbed, args.condition)
    token = None
    if args.token_file:
        from optisplit.cli.worker import read_token

        token = read_token(args.token_file)
    done = []
    for backend in backends:
        with plan_progress(enabled=not args.json) as on_progress:
            calibration = calibrate_overheads(
                testbed,
                backend,
                requests=args.requests,
                rounds=args.rounds,
                window_s=args.window,
                token=token,
                on_progress=on_progress,
            )
        done.append((calibration, save_calibration(calibration, root=args.profiles)))
    _report(args, done)
    return 0


def _report(args: argparse.Namespace, found: list[tuple[Calibration, Any]]) -> None:
    if args.json:
        print_json(
            [{**c.to_dict(), "path": None if path is None else str(path)} for c, path in found]
        )
        return
    print_table(
        [
            "testbed",
            "backend",
            "message ms",
            "handoff ms",
            "handoff ms/MB",
            "queue ms",
            "request ms",
            "request cpu ms",
            "client ms",
            "forward ms",
            "forward ms/MB",
            "client wait %",
            "worker wait %",
            "measured",
        ],
        [
            [
                c.testbed,
                c.backend,
                c.message_ms,
                c.handoff_ms,
                c.handoff_ms_per_mb,
                c.queue_ms,
                c.request_ms,
                "-" if c.request_cpu_ms is None else c.request_cpu_ms,
                c.client_ms,
                c.forward_ms,
                c.forward_ms_per_mb,
                round(c.client_wait_share * 100, 2),
                round(c.worker_wait_share * 100, 2),
                c.created,
            ]
            for c, _ in found
        ],
        title="runtime overheads",
    )
    for _, path in found:
        if path is not None:
            print(f"saved {path}")
