#!/usr/bin/env bash
# CUDA check of the stage worker on a GPU host: a CPU worker hands activations to a CUDA worker
# (and back) over loopback with the socket backend; validate checks every output against the
# single-process CPU model and prints measured latency and throughput as JSON.
# Usage (from the repository root, with torch and this checkout importable):
#   bash bench/cuda_worker.sh [OUTDIR]
set -euo pipefail
out=${1:-bench/results}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
(umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/token")
$py -m optisplit worker --listen 127.0.0.1:29611 --token-file "$work/token" > "$work/cpu.log" 2>&1 &
pids+=($!)
$py -m optisplit worker --listen 127.0.0.1:29612 --token-file "$work/token" --torch-device cuda \
    > "$work/gpu.log" 2>&1 &
pids+=($!)
for log in cpu gpu; do
    for _ in $(seq 100); do grep -q "listening on" "$work/$log.log" && break; sleep 0.2; done
    grep -q "listening on" "$work/$log.log" || { cat "$work/$log.log"; exit 1; }
done
cat > "$work/cudabed.yaml" <<YAML
schema_version: 1
name: cudabed
source: cpu
devices:
  cpu: {profile: host, address: "127.0.0.1:29611"}
  gpu: {profile: host, scale: 0.05, address: "127.0.0.1:29612"}
links:
  - {between: [cpu, gpu], rtt_ms: 0.05, mbps: 10000}
YAML
for spec in "resnet18 15" "mobilenet_v2 23"; do
    set -- $spec
    $py -m optisplit validate "$1" --testbed "$work/cudabed.yaml" --token-file "$work/token" \
        --backend socket --batch-size 8 --requests 20 --warmup 5 --out "$work/studies" \
        --plan "cpu[0:$2]" --plan "gpu[0:$2]" --plan "cpu[0:4] -> gpu[4:$2]" \
        --plan "gpu[0:4] -> cpu[4:$2]" --json > "$out/cuda_worker-$1.json"
    $py - "$out/cuda_worker-$1.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
for r in doc["results"]:
    m = r["measured"] or {}
    print(f"{r['plan']:<28} match={r['outputs_match']} latency_ms={m.get('latency_ms', 0):8.2f} "
          f"throughput_rps={m.get('throughput_rps', 0):8.2f} error={r['error']}")
PY
done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
