#!/usr/bin/env bash
# One training step of PyTorch + transformers + PEFT against `ferrofactory bench step`, in the
# same run, on the same SmolLM2-135M-shaped model with random weights (testdata/smollm2-135m-config):
# tokens/s, peak resident memory, and ferrofactory's ratio to PyTorch for both.
#
# PyTorch lives in a virtual environment outside the project (CPU wheels from PyPI):
#   python3 -m venv /tmp/torchvenv
#   /tmp/torchvenv/bin/pip install torch transformers peft \
#       --extra-index-url https://download.pytorch.org/whl/cpu   # optional: smaller CPU-only wheel
# and point PYTHON at it (default /tmp/ref/bin/python, else /tmp/torchvenv/bin/python).
#
# Usage: bench/pytorch_compare.sh [float32|bf16] [lora|full] [steps] [ferrofactory options...]
# Options after the step count go to `ferrofactory bench step` alone, e.g.
# `--offload-optimizer-dir DIR` (a folder on a disk) to keep gradients and AdamW moments there.
# Build first: cargo build --release -p ferrofactory. Both sides use every core; run it on an
# otherwise idle machine, and compare only figures of one run.
set -euo pipefail

precision=${1:-float32}
finetuning=${2:-lora}
steps=${3:-5}
ours_only=("${@:4}")
cd "$(dirname "$0")/.."

python=${PYTHON:-}
if [[ -z $python ]]; then
    for candidate in /tmp/ref/bin/python /tmp/torchvenv/bin/python; do
        [[ -x $candidate ]] && python=$candidate && break
    done
fi
if [[ -z $python ]] || ! "$python" -c 'import torch, transformers, peft' 2>/dev/null; then
    echo "error: no Python with torch, transformers and peft; install them as the top of $0 says and set PYTHON" >&2
    exit 1
fi
binary=target/release/ferrofactory
if [[ ! -x $binary ]]; then
    echo "error: $binary is missing; run cargo build --release -p ferrofactory" >&2
    exit 1
fi

common=(--batch 4 --seq 256 --steps "$steps" --precision "$precision" --finetuning "$finetuning")
torch_out=$(mktemp)
ours_out=$(mktemp)
trap 'rm -f "$torch_out" "$ours_out"' EXIT

echo "== PyTorch + transformers + PEFT ($precision, $finetuning)"
"$python" bench/pytorch_step.py "${common[@]}" 2>&1 | grep -v "gemm_4bit_forward" | tee "$torch_out"
echo "== ferrofactory bench step ($precision, $finetuning)"
"$binary" bench step "${common[@]}" "${ours_only[@]}" 2>&1 | tee "$ours_out"

field() { # the number after a label, e.g. `field "tokens/s" file`
    awk -v label="$1" 'index($0, label) == 1 { print $(NF - ($NF == "GB")) }' "$2" | tail -1
}
torch_tps=$(field "tokens/s" "$torch_out")
ours_tps=$(field "tokens/s" "$ours_out")
torch_rss=$(field "peak RSS" "$torch_out")
ours_rss=$(field "peak RSS" "$ours_out")
echo "== $precision $finetuning, batch 4 x 256, median of $steps steps, $(nproc) cores"
printf '%-22s %12s %12s %10s\n' "" "PyTorch" "ferrofactory" "ratio"
printf '%-22s %12s %12s %9.2fx\n' "tokens/s" "$torch_tps" "$ours_tps" "$(echo "$ours_tps / $torch_tps" | bc -l)"
printf '%-22s %10s GB %10s GB %9.2fx\n' "peak RSS" "$torch_rss" "$ours_rss" "$(echo "$ours_rss / $torch_rss" | bc -l)"
