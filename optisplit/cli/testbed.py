"""``optisplit testbed up|down|status``: the emulated testbed on this machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optisplit.cli._common import (
    add_json_flag,
    positive_float,
    print_json,
    print_table,
    progress,
)
from optisplit.errors import TestbedError, UsageError

if TYPE_CHECKING:
    from optisplit.emulate.checks import CheckReport
    from optisplit.testbed import Testbed

__all__ = ["register"]

_NOT_ROOT = (
    "warning: not root, so testbed {name} is not emulated: devices run as processes on "
    "loopback (127.0.0.1) with no link shaping and no CPU limits"
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "testbed",
        help="build, check and remove the emulated testbed on this machine",
        description=(
            "Emulate a testbed on this machine: one network namespace per device, links shaped "
            "to the testbed's RTT and rate, each device pinned to its cores under its CPU quota. "
            "Needs root; without it devices run on loopback with no shaping."
        ),
    )
    sub = parser.add_subparsers(dest="testbed_command", metavar="ACTION", required=True)
    up = sub.add_parser("up", help="build the testbed and check it against its spec")
    _testbed_arg(up)
    up.add_argument(
        "--no-check", action="store_true", help="skip the link and device checks (not advised)"
    )
    add_json_flag(up)
    up.set_defaults(func=_up)
    down = sub.add_parser("down", help="remove the testbed and anything left of it; idempotent")
    down.add_argument("testbed", nargs="?", help="testbed name or YAML file")
    down.add_argument("--all", action="store_true", help="remove every emulated testbed here")
    down.add_argument("--profiles-root", default="profiles", help="folder holding testbeds/")
    add_json_flag(down)
    down.set_defaults(func=_down)
    status = sub.add_parser("status", help="measure the testbed's devices and links")
    _testbed_arg(status)
    add_json_flag(status)
    status.set_defaults(func=_status)


def _testbed_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("testbed", help="testbed name (profiles/testbeds/NAME.yaml) or YAML file")
    parser.add_argument("--profiles-root", default="profiles", help="folder holding testbeds/")
    parser.add_argument(
        "--condition", help="give every link a named condition: lan, wifi or constrained"
    )
    parser.add_argument(
        "--link-rtt-ms", type=non_negative_float, help="give every link this RTT (ms)"
    )
    parser.add_argument("--link-mbps", type=positive_float, help="give every link this rate")


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _load(args: argparse.Namespace) -> Testbed:
    from optisplit.testbed import apply_condition, load_testbed

    testbed = load_testbed(args.testbed, root=args.profiles_root)
    if getattr(args, "condition", None):
        testbed = apply_condition(testbed, args.condition)
    if getattr(args, "link_rtt_ms", None) is not None or getattr(args, "link_mbps", None):
        testbed = testbed.with_links(rtt_ms=args.link_rtt_ms, mbps=args.link_mbps)
    return testbed


def _checking(testbed: Testbed) -> Any:
    total = len(testbed.devices) ** 2  # devices plus ordered device pairs
    return progress(f"checking {testbed.name}", total, enabled=sys.stderr.isatty())


def _up(args: argparse.Namespace) -> int:
    from optisplit import emulate
    from optisplit.emulate import checks, sandbox

    testbed = _load(args)
    if not sandbox.is_root():
        print(_NOT_ROOT.format(name=testbed.name), file=sys.stderr)
        report = emulate.check_testbed(testbed)
    else:
        with _checking(testbed) as bar:
            found = emulate.up(testbed, check=not args.no_check, on_check=lambda w: bar.advance())
        report = found or checks.check_testbed(testbed, links=False, devices=False)
    _show(report, args, title=f"testbed {testbed.name} is up")
    return 0


def _down(args: argparse.Namespace) -> int:
    from optisplit.emulate import sandbox

    if args.all == bool(args.testbed):
        raise UsageError("give a testbed name or file, or --all (not both)")
    if not sandbox.is_root():
        print("warning: not root, so nothing was emulated and nothing is removed", file=sys.stderr)
        removed: list[str] = []
    elif args.all:
        removed = sandbox.teardown_all()
    else:
        removed = sandbox.teardown(_name(args))
    if args.json:
        print_json({"removed": removed})
    else:
        print("\n".join(f"removed {what}" for what in removed) or "nothing was up")
    return 0


def _name(args: argparse.Namespace) -> str:
    """The testbed's name: from its file when it loads, else the argument itself."""
    from optisplit.testbed import testbed_path

    path = Path(args.testbed)
    if (
        path.suffix in (".yaml", ".yml")
        or path.exists()
        or testbed_path(args.testbed, root=args.profiles_root).exists()
    ):
        try:
            return str(_load(args).name)
        except TestbedError:
            if path.suffix in (".yaml", ".yml"):
                return path.stem
    return str(args.testbed)


def _status(args: argparse.Namespace) -> int:
    from optisplit import emulate
    from optisplit.emulate import checks, sandbox

    testbed = _load(args)
    if not sandbox.is_root():
        print(_NOT_ROOT.format(name=testbed.name), file=sys.stderr)
    elif not emulate.is_up(testbed):
        print(
            f"warning: testbed {testbed.name} is not up (run 'optisplit testbed up "
            f"{args.testbed}'); devices would run on loopback",
            file=sys.stderr,
        )
    with _checking(testbed) as bar:
        report = checks.check_testbed(testbed, on_check=lambda what: bar.advance())
    _show(report, args, title=f"testbed {testbed.name}")
    if report.emulated and not report.ok:
        raise TestbedError(f"testbed {testbed.name} is off spec: " + "; ".join(report.problems()))
    return 0


def _quota_cell(cpu_quota: float, throttle: str) -> str:
    return f"{cpu_quota:g}" if throttle == "quota" else f"{cpu_quota:g} ({throttle})"


def _show(report: CheckReport, args: argparse.Namespace, *, title: str) -> None:
    if args.json:
        print_json(report.to_dict())
        return
    print_table(
        ["device", "address", "cores", "cpu_quota", "speed", "expected", "ok"],
        [
            [
                d.name,
                d.address,
                ",".join(map(str, d.cores)) if d.cores else "-",
                "-" if d.cpu_quota is None else _quota_cell(d.cpu_quota, d.throttle),
                "-" if d.speed is None else d.speed,
                "-" if d.expected_speed is None else d.expected_speed,
                "yes" if d.ok else "NO",
            ]
            for d in report.devices
        ],
        title=f"{title} ({'delay path: ' + report.delay_path})",
    )
    if report.links:
        print_table(
            ["src", "dst", "rtt_ms", "spec rtt_ms", "mbps", "spec mbps", "ok"],
            [
                [
                    link.src,
                    link.dst,
                    link.rtt_ms,
                    link.expected_rtt_ms,
                    link.mbps,
                    link.expected_mbps,
                    "yes" if link.ok else "NO",
                ]
                for link in report.links
            ],
        )
