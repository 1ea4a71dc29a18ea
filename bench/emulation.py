"""How faithful the emulated testbed is: links and devices measured against their spec.

Brings a two-device testbed (the shipped ``local`` one, renamed so that it does not disturb a
running ``local``) up under each link condition, measures every device pair's RTT and rate and
every device's share of its cores, and times ``up`` and ``down``. Also measures what the
forwarder adds to a round trip (host to a device, unshaped, against plain loopback).

Run as root: ``.venv/bin/python bench/emulation.py``; writes ``bench/results/emulation.json``.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from optisplit import emulate
from optisplit.emulate import checks, sandbox
from optisplit.testbed import CONDITIONS, apply_condition, load_testbed

ROOT = Path(__file__).resolve().parents[1]


def _rtt_ms(address: str, port: int, count: int = 300) -> float:
    with socket.create_connection((address, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        samples = []
        for _ in range(count):
            t = time.perf_counter()
            sock.sendall(b"x" * 32)
            checks._recv_exact(sock, 32)
            samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def forwarder_overhead(state: Any) -> dict[str, float]:
    """Median RTT host -> device through the forwarder (unshaped) and over loopback."""
    device = next(iter(state.devices.values()))
    server = checks._server(device.netns, device.address)
    thread = checks._serve(server, checks._echo)
    through = _rtt_ms(device.address, server.getsockname()[1])
    server.close()
    thread.join()
    local = socket.create_server(("127.0.0.1", 0))
    thread = checks._serve(local, checks._echo)
    loopback = _rtt_ms("127.0.0.1", local.getsockname()[1])
    local.close()
    thread.join()
    return {"forwarder_rtt_ms": through, "loopback_rtt_ms": loopback}


def main() -> int:
    if os.geteuid() != 0:
        print("bench/emulation.py needs root (namespaces, cgroups)", file=sys.stderr)
        return 1
    base = load_testbed(str(ROOT / "profiles" / "testbeds" / "local.yaml"))
    base = type(base)(**{**base.__dict__, "name": f"bench{os.getpid()}"})
    rows: list[dict[str, Any]] = []
    overhead: dict[str, float] = {}
    try:
        for condition in CONDITIONS:
            testbed = apply_condition(base, condition)
            t = time.perf_counter()
            emulate.up(testbed, check=False)
            up_s = time.perf_counter() - t
            t = time.perf_counter()
            report = checks.check_testbed(testbed)
            check_s = time.perf_counter() - t
            if not overhead:
                state = sandbox.running(testbed)
                overhead = forwarder_overhead(state)
            for link in report.links:
                rows.append(
                    {
                        "condition": condition,
                        "kind": "link",
                        "what": f"{link.src}->{link.dst}",
                        "spec_rtt_ms": link.expected_rtt_ms,
                        "rtt_ms": link.rtt_ms,
                        "spec_mbps": link.expected_mbps,
                        "mbps": link.mbps,
                        "ok": link.ok,
                    }
                )
            for device in report.devices:
                rows.append(
                    {
                        "condition": condition,
                        "kind": "device",
                        "what": device.name,
                        "spec_speed": device.expected_speed,
                        "speed": device.speed,
                        "ok": device.ok,
                    }
                )
            rows.append(
                {"condition": condition, "kind": "timing", "up_s": up_s, "check_s": check_s}
            )
    finally:
        t = time.perf_counter()
        emulate.down(base.name)
        down_s = time.perf_counter() - t
    _print(rows, overhead, down_s)
    out = ROOT / "bench" / "results" / "emulation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "overhead": overhead, "down_s": down_s}, indent=2))
    print(f"wrote {out}")
    return 0


def _print(rows: list[dict[str, Any]], overhead: dict[str, float], down_s: float) -> None:
    print(f"{'condition':<12}{'what':<12}{'spec':>18}{'measured':>20}{'error':>9}  ok")
    for r in rows:
        if r["kind"] == "link":
            spec = f"{r['spec_rtt_ms']:.1f} ms {r['spec_mbps']:.0f} Mb/s"
            got = f"{r['rtt_ms']:.2f} ms {r['mbps']:.1f} Mb/s"
            err = max(abs(r["rtt_ms"] / r["spec_rtt_ms"] - 1), abs(r["mbps"] / r["spec_mbps"] - 1))
            print(f"{r['condition']:<12}{r['what']:<12}{spec:>18}{got:>20}{err:>8.1%}  {r['ok']}")
        elif r["kind"] == "device":
            err = abs(r["speed"] / r["spec_speed"] - 1)
            spec, got = f"speed {r['spec_speed']:.2f}", f"{r['speed']:.3f}"
            print(f"{r['condition']:<12}{r['what']:<12}{spec:>18}{got:>20}{err:>8.1%}  {r['ok']}")
        else:
            print(f"{r['condition']:<12}up {r['up_s']:.2f} s, checks {r['check_s']:.2f} s")
    print(
        f"round trip host->device through the forwarder {overhead['forwarder_rtt_ms']:.3f} ms, "
        f"loopback {overhead['loopback_rtt_ms']:.3f} ms; down {down_s:.2f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
