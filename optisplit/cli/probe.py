"""``optisplit probe-server`` and ``optisplit probe-link``: measure a link's RTT and bandwidth."""

from __future__ import annotations

import argparse
from typing import Any

from optisplit.cli._common import (
    add_json_flag,
    positive_float,
    positive_int,
    print_json,
    print_table,
)
from optisplit.errors import UsageError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    server = subparsers.add_parser(
        "probe-server",
        help="answer link probes on HOST:PORT",
        description=(
            "Serve link probes (RTT pings and bulk transfers) until interrupted. Workers "
            "answer probes on their own port too. With --token-file, clients must pass the HMAC "
            "challenge of the shared secret."
        ),
    )
    server.add_argument(
        "--listen",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="address (default: %(default)s)",
    )
    server.add_argument(
        "--token-file", metavar="F", default=None, help="file holding the shared secret"
    )
    server.set_defaults(func=_serve)

    link = subparsers.add_parser(
        "probe-link",
        help="measure RTT and bandwidth to a probe server or worker",
        description=(
            "Measure the round-trip time (median of small pings) and the bandwidth of both "
            "directions (bulk transfers) to HOST:PORT. With --testbed and --link A,B the result is "
            "recorded in profiles/links/<testbed>.json."
        ),
    )
    link.add_argument("address", metavar="HOST:PORT", help="probe server or worker")
    link.add_argument(
        "--token-file", metavar="F", default=None, help="file holding the shared secret"
    )
    link.add_argument("--testbed", default=None, help="testbed whose link this is")
    link.add_argument("--link", default=None, metavar="A,B", help="the two devices of the link")
    link.add_argument(
        "--samples", type=positive_int, default=50, help="RTT pings (default: %(default)s)"
    )
    link.add_argument(
        "--bulk-mb",
        type=positive_float,
        default=8.0,
        help="MiB per direction (default: %(default)s)",
    )
    link.add_argument(
        "--profiles", default="profiles", help="profiles root (default: %(default)s)"
    )
    add_json_flag(link)
    link.set_defaults(func=_probe)


def _token(path: str | None) -> bytes | None:
    from optisplit.cli.worker import read_token

    return None if path is None else read_token(path)


def _serve(args: argparse.Namespace) -> int:
    from optisplit.cli.worker import parse_address
    from optisplit.probe import ProbeServer

    host, port = parse_address(args.listen)
    token = _token(args.token_file)
    try:
        server = ProbeServer(host, port, token)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from None
    bound_host, bound_port = server.address
    print(f"optisplit probe server listening on {bound_host}:{bound_port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()
    return 0


def _link_devices(args: argparse.Namespace) -> tuple[str, str] | None:
    if args.link is None and args.testbed is None:
        return None
    if args.link is None or args.testbed is None:
        raise UsageError("--testbed and --link A,B go together")
    from optisplit.testbed import load_testbed

    testbed = load_testbed(args.testbed, root=args.profiles)
    names = [n.strip() for n in args.link.split(",")]
    if len(names) != 2 or names[0] == names[1]:
        raise UsageError(f"--link expects two different devices A,B, got {args.link!r}")
    for name in names:
        if name not in testbed.devices:
            raise UsageError(
                f"--link: {name!r} is not a device of testbed {testbed.name} "
                f"({', '.join(sorted(testbed.devices))})"
            )
    args.testbed_name = testbed.name
    return names[0], names[1]


def _probe(args: argparse.Namespace) -> int:
    from optisplit.cli.worker import parse_address
    from optisplit.probe import probe_link, save_link_measurement

    host, port = parse_address(args.address)
    pair = _link_devices(args)
    measured = probe_link(
        host,
        port,
        token=_token(args.token_file),
        rtt_samples=args.samples,
        bulk_bytes=int(args.bulk_mb * 2**20),
    )
    saved = None
    if pair is not None:
        saved = save_link_measurement(args.testbed_name, *pair, measured, root=args.profiles)
    if args.json:
        print_json({**measured.to_dict(), "saved": None if saved is None else str(saved)})
        return 0
    print_table(
        ["address", "rtt ms", "p10 ms", "p90 ms", "up Mbit/s", "down Mbit/s"],
        [
            [
                measured.address,
                measured.rtt_ms,
                measured.rtt_p10_ms,
                measured.rtt_p90_ms,
                measured.up_mbps,
                measured.down_mbps,
            ]
        ],
    )
    if saved is not None:
        print(f"recorded in {saved}")
    return 0
