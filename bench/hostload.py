"""Host load: CPU time per request of every process while one plan runs pipelined.

Validates one plan on an emulated testbed (brought up under ``--condition``) and reads, from
``/proc``, the CPU time each process and thread used between the first and the last request of
the throughput phase: the device workers, the delay forwarder, the client, anything else. An
emulated testbed measures its devices only while the host has CPU to spare beyond them; when
the total comes near ``cores x period`` the measured throughput is the host's, not the plan's.
``--quota DEVICE=Q`` runs a device at another speed than its testbed file says.

    .venv/bin/python bench/hostload.py [--model mobilenet_v2] [--testbed local3]
        [--plan 'fast[0:11] -> slow1[11:16] -> slow2[16:23]'] [--backend socket]
        [--condition lan] [--requests 300] [--quota slow1=0.5 --quota slow2=0.4]

Prints a table and writes bench/results/hostload.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not bench/: its scripts would shadow modules (profile)

from optisplit import emulate  # noqa: E402
from optisplit.testbed import apply_condition, load_testbed  # noqa: E402
from optisplit.validate import validate_plans  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")
STAT_NAMES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def _ticks(path: str) -> tuple[str, int, int]:
    """(command name, CPU ticks, last CPU) of a /proc stat file."""
    text = Path(path).read_text()
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text.rsplit(")", 1)[1].split()
    return name, int(fields[11]) + int(fields[12]), int(fields[36])


def _snapshot() -> dict[str, Any]:
    procs: dict[int, dict[str, Any]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            threads = {
                int(tid): _ticks(f"/proc/{entry}/task/{tid}/stat")
                for tid in os.listdir(f"/proc/{entry}/task")
            }
            _, total, _ = _ticks(f"/proc/{entry}/stat")
        except (OSError, ValueError):  # the process ended while being read
            continue
        procs[int(entry)] = {"cmd": cmd.strip()[:80], "ticks": total, "threads": threads}
    host = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return {"procs": procs, "host": host, "time": time.monotonic()}


def _per_request(before: dict[str, Any], after: dict[str, Any], n: int) -> dict[str, Any]:
    def ms(ticks: int) -> float:
        return ticks / HZ / n * 1e3

    rows = []
    for pid, proc in after["procs"].items():
        old = before["procs"].get(pid)
        if old is None or proc["ticks"] <= old["ticks"]:
            continue
        threads = []
        for tid, (name, ticks, cpu) in proc["threads"].items():
            was = old["threads"].get(tid)
            if was is not None and ticks > was[1]:
                threads.append({"name": name, "ms": ms(ticks - was[1]), "last_cpu": cpu})
        threads.sort(key=lambda t: -t["ms"])
        rows.append(
            {"cmd": proc["cmd"], "ms": ms(proc["ticks"] - old["ticks"]), "threads": threads}
        )
    rows.sort(key=lambda r: -r["ms"])
    host = {k: ms(b - a) for k, a, b in zip(STAT_NAMES, before["host"], after["host"])}
    seconds = after["time"] - before["time"]
    return {"processes": rows, "host": host, "period_ms": seconds / n * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--testbed", default="local3")
    parser.add_argument("--plan", default="fast[0:11] -> slow1[11:16] -> slow2[16:23]")
    parser.add_argument("--backend", default="socket", choices=("socket", "rpc"))
    parser.add_argument("--condition", default="lan")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--quota", action="append", default=[], metavar="DEVICE=Q")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "hostload.json"))
    args = parser.parse_args()

    base = load_testbed(args.testbed)
    devices = dict(base.devices)
    for item in args.quota:
        name, _, value = item.partition("=")
        if name not in devices:
            raise SystemExit(f"--quota {item}: no device {name} in testbed {base.name}")
        devices[name] = dataclasses.replace(devices[name], cpu_quota=float(value))
    bed = apply_condition(dataclasses.replace(base, devices=devices), args.condition)
    marks: dict[str, dict[str, Any]] = {}

    def on_progress(plan: str, phase: str, done: int, total: int) -> None:
        if phase == "throughput" and done in (1, total):
            marks["first" if done == 1 else "last"] = _snapshot()

    was_up = emulate.is_up(base)
    try:
        emulate.up(bed)
        (result,) = validate_plans(
            args.model,
            bed,
            [args.plan],
            backend=args.backend,
            requests=args.requests,
            on_progress=on_progress,
            out_dir=ROOT / "bench" / "results" / "hostload",
        )
    finally:
        if not was_up:
            emulate.down(base.name)
    if result["error"]:
        raise SystemExit(f"plan failed: {result['error']}")
    load = _per_request(marks["first"], marks["last"], args.requests - 1)
    measured = result["measured"]
    cores = os.cpu_count() or 1
    busy = sum(v for k, v in load["host"].items() if k not in ("idle", "iowait"))
    print(f"{args.plan} ({args.backend}, {args.condition}, quotas {args.quota or 'as in file'})")
    print(
        f"throughput {measured['throughput_rps']:.1f} req/s, period {load['period_ms']:.2f} ms; "
        f"host busy {busy:.2f} of {cores * load['period_ms']:.2f} ms of CPU per request"
    )
    print(f"{'ms/request':>10}  process (threads: ms on last cpu)")
    for row in load["processes"][:8]:
        threads = ", ".join(f"{t['ms']:.2f}@cpu{t['last_cpu']}" for t in row["threads"][:4])
        print(f"{row['ms']:>10.2f}  {row['cmd']}\n{'':>12}{threads}")
    document = {
        "model": args.model,
        "testbed": bed.name,
        "plan": args.plan,
        "backend": args.backend,
        "condition": args.condition,
        "quotas": args.quota,
        "requests": args.requests,
        "throughput_rps": measured["throughput_rps"],
        "host_busy_ms": busy,
        "host_capacity_ms": cores * load["period_ms"],
        **load,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
