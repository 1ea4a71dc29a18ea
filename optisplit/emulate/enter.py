"""Launcher: join a device's cgroup, pin to its cores, enter its network namespace, exec.

``python -m optisplit.emulate.enter [--cgroup DIR] [--cores 0,1] [--netns NAME] [--pace S] [--anchor MS] -- ARGV``

``--pace`` hands a paced device's speed to the command (``OPTISPLIT_PACE``, see
:mod:`optisplit.pace`), ``--anchor`` the reference time it paces against
(``OPTISPLIT_PACE_ANCHOR``, anchored pacing).

The order matters: the cgroup is joined first, while ``/sys`` is still the host's, and the
namespace is entered with ``setns(2)`` rather than ``ip netns exec`` (which remounts ``/sys``).
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m optisplit.emulate.enter")
    parser.add_argument("--cgroup", help="cgroup folder to join")
    parser.add_argument("--cores", help="comma-separated cores to pin to")
    parser.add_argument("--netns", help="network namespace name (under /run/netns)")
    parser.add_argument("--ifname", help="the namespace's interface, for TensorPipe and Gloo")
    parser.add_argument("--pace", help="speed of a paced device, in (0, 1]")
    parser.add_argument("--anchor", help="reference kernel time (ms) a paced device keeps to")
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        print("enter: no command given", file=sys.stderr)
        return 2
    try:
        if args.cgroup:
            from optisplit.emulate.cgroup import join

            join(args.cgroup)
        if args.cores:
            os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})
        if args.netns:
            from optisplit.emulate.netns import NETNS_DIR, setns

            fd = os.open(NETNS_DIR / args.netns, os.O_RDONLY)
            setns(fd)
            os.close(fd)
        if args.ifname:
            # RPC backends pick their interface from these; without them they may choose lo.
            os.environ.setdefault("TP_SOCKET_IFNAME", args.ifname)
            os.environ.setdefault("GLOO_SOCKET_IFNAME", args.ifname)
        if args.pace:
            from optisplit.pace import ENV, check_speed

            os.environ[ENV] = str(check_speed(args.pace, "--pace"))
        if args.anchor:
            from optisplit.pace import ANCHOR_ENV, check_anchor

            os.environ[ANCHOR_ENV] = str(check_anchor(args.anchor, "--anchor"))
        os.execvp(command[0], command)
    except Exception as exc:  # reported as one line; the caller sees exit code 1
        print(f"enter: {exc}", file=sys.stderr)
        return 1
    return 0  # pragma: no cover (execvp does not return)


if __name__ == "__main__":
    sys.exit(main())
