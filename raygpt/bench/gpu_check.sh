#!/usr/bin/env bash
# The GPU readiness check, one short script (about 5-10 minutes on an H100/H200):
#   1. raygpt's train step (raygpt.training.step.train_step) on GPT-2 small, context 1024, bf16, one GPU,
#      compiled and not: tokens/s, MFU, peak memory (raygpt/bench/gpu_check.py; needs only torch);
#   2. if Ray and PyYAML are installed: the same model through `raygpt bench` rows 0 (bare
#      PyTorch loop), a (raygpt's loop) and b (raygpt on 1 Ray Train worker), compiled.
# Goal: >= 50% MFU on one H100/H200 (anchors: nanoGPT ~37% on A100, llm.c GPT-2 124M ~40-50% on
# H100-class GPUs). Run from the repository root: bash raygpt/bench/gpu_check.sh [OUT_DIR]
set -uo pipefail
out=${1:-gpu_check_out}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)
py=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for mode in "" "--no-compile"; do
  $py -m raygpt.bench.gpu_check --steps 30 $mode 2>&1 | tee -a "$out/gpu_check.txt" | grep -v '^{'
done
if $py -c "import ray, yaml" 2>/dev/null; then
  [ -f data/stdlib/manifest.json ] || $py -m raygpt prepare --source stdlib --out data/stdlib
  $py -m raygpt bench --device cuda --preset gpt2-small --precision bf16 --compile --rows 0ab \
      --steps 40 --repeats 1 2>&1 | tee "$out/bench.txt" | grep -v '^{"benchmark"'
else
  echo "ray / PyYAML not installed here: skipping the rows through raygpt and Ray" | tee "$out/bench.txt"
fi
grep -h '^{' "$out"/gpu_check.txt "$out"/bench.txt > "$out/results.jsonl" || true
echo "results: $out/results.jsonl"
