#!/usr/bin/env bash
# The first contact with a GPU, as one command (issue 21): `collapse-jax bench --suite full`
# (MFU with its FLOP convention, the paper's beam search, one paper generation, the theory
# kernel and its device-to-host copy apart, EM, the VAE; compared with the aims on one H100),
# then the gpu test lane (`pytest -m gpu tests/gpu`). Under 8 minutes on one H100: each part
# runs under a time limit, and the bench writes its JSON after every measurement, so a part
# that runs out of time still leaves what it finished.
#
#   bash benchmarks/gpu_first_contact.sh
#
# Writes to benchmarks/results/ (the device's name in every file name):
#   bench-full-<device>.json          the bench report (rows, targets, flop_convention, ...)
#   gpu_first_contact-<device>.json   what ran: device, exit codes, times, the lane's summary
#   gpu_lane-<device>.xml, .log       the lane's per-test results (JUnit XML) and its output
# Knobs (environment): GPU_FIRST_CONTACT_SUITE (default full; "quick" to try the script on a
# CPU), GPU_FIRST_CONTACT_ONLY (bench --only), GPU_FIRST_CONTACT_OUT (results folder),
# GPU_FIRST_CONTACT_BENCH_S / _LANE_S (time limits, default 320 / 120 s),
# COLLAPSE_JAX_COMPILE_CACHE (default ~/.cache/collapse-jax/jax-compile: a second call skips
# most compilation) and COLLAPSE_JAX_GPU_LANE_BENCH_ONLY (the lane's own `bench --suite quick`
# call; default train,gaussian_exact, since the full suite ran every benchmark just before).
set -u
cd "$(dirname "$0")/.."
suite="${GPU_FIRST_CONTACT_SUITE:-full}"
out="${GPU_FIRST_CONTACT_OUT:-benchmarks/results}"
bench_s="${GPU_FIRST_CONTACT_BENCH_S:-320}"
lane_s="${GPU_FIRST_CONTACT_LANE_S:-120}"
py="${PYTHON:-python}"
mkdir -p "$out"
export COLLAPSE_JAX_COMPILE_CACHE="${COLLAPSE_JAX_COMPILE_CACHE:-$HOME/.cache/collapse-jax/jax-compile}"
export COLLAPSE_JAX_GPU_LANE_BENCH_ONLY="${COLLAPSE_JAX_GPU_LANE_BENCH_ONLY:-train,gaussian_exact}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
start=$(date +%s)

device=$("$py" -c 'import jax; d = jax.devices()[0]
print(d.device_kind if d.platform != "cpu" else "cpu")')
slug=$(printf '%s' "$device" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9' '_' | sed 's/_*$//; s/^_*//')
echo "== device: $device ($slug); suite $suite; results in $out"

bench_json="$out/bench-$suite-$slug.json"
only_args=()
if [ -n "${GPU_FIRST_CONTACT_ONLY:-}" ]; then only_args=(--only "$GPU_FIRST_CONTACT_ONLY"); fi
t0=$(date +%s)
timeout --kill-after=10 "$bench_s" "$py" -m collapse_jax bench --suite "$suite" \
  --out "$bench_json" ${only_args[@]+"${only_args[@]}"}
bench_rc=$?
bench_wall=$(( $(date +%s) - t0 ))

lane_xml="$out/gpu_lane-$slug.xml"
t0=$(date +%s)
timeout --kill-after=10 "$lane_s" "$py" -m pytest -q -rs -m gpu tests/gpu -p no:cacheprovider \
  --junitxml="$lane_xml" 2>&1 | tee "$out/gpu_lane-$slug.log"
lane_rc=${PIPESTATUS[0]}
lane_wall=$(( $(date +%s) - t0 ))

"$py" - "$out/gpu_first_contact-$slug.json" "$device" "$suite" "$bench_json" "$bench_rc" \
  "$bench_wall" "$lane_xml" "$lane_rc" "$lane_wall" "$(( $(date +%s) - start ))" <<'PY'
import json, pathlib, sys, xml.etree.ElementTree as ET

path, device, suite, bench_json, bench_rc, bench_s, lane_xml, lane_rc, lane_s, total = sys.argv[1:]
lane = None
if pathlib.Path(lane_xml).is_file():
    s = ET.parse(lane_xml).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    lane = {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
bench = json.loads(pathlib.Path(bench_json).read_text()) if pathlib.Path(bench_json).is_file() else {}
report = dict(
    device=device, suite=suite, total_s=int(total),
    bench=dict(json=bench_json, exit_code=int(bench_rc), wall_s=int(bench_s),
               timed_out=int(bench_rc) in (124, 137), rows=len(bench.get("rows", [])),
               targets=bench.get("targets", [])),
    gpu_lane=dict(junit=lane_xml, exit_code=int(lane_rc), wall_s=int(lane_s),
                  timed_out=int(lane_rc) in (124, 137), counts=lane),
)
pathlib.Path(path).write_text(json.dumps(report, indent=1) + "\n")
print(f"== wrote {path}: bench exit {bench_rc} ({bench_s} s), gpu lane exit {lane_rc} "
      f"({lane_s} s), {total} s in all")
PY
[ "$bench_rc" -eq 0 ] && [ "$lane_rc" -eq 0 ]
