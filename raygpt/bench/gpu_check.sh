#!/usr/bin/env bash
# The GPU readiness check, in parts that each finish within a few minutes on one H100-class GPU
# and print as they go (a machine lent for 10 minutes a command runs one part per command):
#
#   bash raygpt/bench/gpu_check.sh check [OUT]   raygpt's train step on GPT-2 small, one worker's share of
#                                                jobs/gpt2-small.yaml, compiled: tokens/s, MFU, peak memory
#                                                (python -m raygpt.bench.gpu_check; needs only torch)
#   bash raygpt/bench/gpu_check.sh eager [OUT]   the same, not compiled
#   bash raygpt/bench/gpu_check.sh rows [OUT]    `raygpt bench` rows 0 (bare PyTorch loop) and a (raygpt's
#                                                loop), compiled, on the prepared default corpus
#   bash raygpt/bench/gpu_check.sh ray [OUT]     row b: raygpt's loop on 1 Ray Train worker, compiled
#   bash raygpt/bench/gpu_check.sh all [OUT]     the four in turn
#
# Goal: >= 50% MFU on one H100/H200 (anchors: llm.c and llm-foundry's GPT-2 124M class at 40-50% on
# A100/H100, nanoGPT ~37% on an A100). Run from the repository root; figures in OUT (default
# gpu_check_out)/results.jsonl, one JSON object per measurement.
set -euo pipefail
part=${1:-all}
out=${2:-gpu_check_out}
py=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)
mkdir -p "$out"

need() {  # every module a part imports, named before it starts rather than a row missing after
  local missing
  missing=$($py -c "
import importlib.util, sys
print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))" "$@")
  if [ -n "$missing" ]; then
    echo "gpu_check.sh $part: missing Python packages: $missing (pip install -e . installs them)" >&2
    exit 2
  fi
}

run() {  # a command whose JSON lines go to results.jsonl and whose other lines to the screen
  local log=$1 rc; shift
  echo "== $part: $*"
  set +e
  "$@" 2>&1 | tee -a "$out/$log" | grep --line-buffered -v '^{'
  rc=${PIPESTATUS[0]}
  set -e
  cat "$out"/*.txt | grep -h '^{' > "$out/results.jsonl" || true
  if [ "$rc" -ne 0 ]; then
    echo "gpu_check.sh $part: failed (exit $rc); its output is in $out/$log" >&2
    exit "$rc"
  fi
}

prepare_data() {
  [ -f data/stdlib/manifest.json ] || run prepare.txt $py -m raygpt prepare --source stdlib --out data/stdlib
}

part_check() { need torch; run gpu_check.txt $py -m raygpt.bench.gpu_check --steps 30; }
part_eager() { need torch; run gpu_check.txt $py -m raygpt.bench.gpu_check --steps 30 --no-compile; }
part_rows() {
  need torch yaml tiktoken pyarrow tensorboard
  prepare_data
  run bench.txt $py -m raygpt bench --device cuda --preset gpt2-small --precision bf16 --compile --rows 0a \
      --steps 40 --repeats 1
}
part_ray() {
  need torch yaml tiktoken pyarrow tensorboard ray
  prepare_data
  run bench_ray.txt $py -m raygpt bench --device cuda --preset gpt2-small --precision bf16 --compile --rows b \
      --steps 40 --repeats 1
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | tee "$out/gpu.txt"
case "$part" in
  check) part_check ;;
  eager) part_eager ;;
  rows) part_rows ;;
  ray) part_ray ;;
  all) part_check; part_eager; part_rows; part_ray ;;
  *) echo "gpu_check.sh: unknown part '$part'; use check, eager, rows, ray or all" >&2; exit 2 ;;
esac
echo "results: $out/results.jsonl"
