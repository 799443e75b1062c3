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
#
# ROUNDS=N runs the two sides alternately N times and ends with each round's ratios and their
# medians: on a host whose speed drifts over minutes, sides run in the same minutes compare
# better than one run of each.
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
rounds=${ROUNDS:-1}
if ! [[ $rounds =~ ^[1-9][0-9]*$ ]]; then
    echo "error: ROUNDS must be a positive whole number, not '$rounds'" >&2
    exit 1
fi
torch_out=$(mktemp)
ours_out=$(mktemp)
trap 'rm -f "$torch_out" "$ours_out"' EXIT

field() { # the number after a label, e.g. `field "tokens/s" file`
    awk -v label="$1" 'index($0, label) == 1 { print $(NF - ($NF == "GB")) }' "$2" | tail -1
}
ratio() { echo "$1 / $2" | bc -l; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

rows=()
speed_ratios=()
memory_ratios=()
for round in $(seq "$rounds"); do
    echo "== PyTorch + transformers + PEFT ($precision, $finetuning)"
    "$python" bench/pytorch_step.py "${common[@]}" 2>&1 | grep -v "gemm_4bit_forward" | tee "$torch_out"
    echo "== ferrofactory bench step ($precision, $finetuning)"
    "$binary" bench step "${common[@]}" "${ours_only[@]}" 2>&1 | tee "$ours_out"
    torch_tps=$(field "tokens/s" "$torch_out")
    ours_tps=$(field "tokens/s" "$ours_out")
    torch_rss=$(field "peak RSS" "$torch_out")
    ours_rss=$(field "peak RSS" "$ours_out")
    if [[ -z $torch_tps || -z $ours_tps || -z $torch_rss || -z $ours_rss ]]; then
        echo "error: a side printed no tokens/s or peak RSS line; its output is above" >&2
        exit 1
    fi
    speed_ratios+=("$(ratio "$ours_tps" "$torch_tps")")
    memory_ratios+=("$(ratio "$ours_rss" "$torch_rss")")
    rows+=("$(printf '%-7s %10s %12s %8.2fx %10s GB %10s GB %8.2fx' "$round" "$torch_tps" "$ours_tps" \
        "${speed_ratios[-1]}" "$torch_rss" "$ours_rss" "${memory_ratios[-1]}")")
done

echo "== $precision $finetuning, batch 4 x 256, median of $steps steps, $(nproc) cores"
if ((rounds == 1)); then
    printf '%-22s %12s %12s %10s\n' "" "PyTorch" "ferrofactory" "ratio"
    printf '%-22s %12s %12s %9.2fx\n' "tokens/s" "$torch_tps" "$ours_tps" "${speed_ratios[0]}"
    printf '%-22s %10s GB %10s GB %9.2fx\n' "peak RSS" "$torch_rss" "$ours_rss" "${memory_ratios[0]}"
    exit 0
fi
printf '%-7s %10s %12s %9s %13s %13s %9s\n' "round" "PyTorch" "ferrofactory" "ratio" \
    "RSS PyTorch" "ferrofactory" "ratio"
printf '%s\n' "${rows[@]}"
printf 'median of %s rounds: tokens/s %.2fx, peak RSS %.2fx\n' "$rounds" \
    "$(median "${speed_ratios[@]}")" "$(median "${memory_ratios[@]}")"
