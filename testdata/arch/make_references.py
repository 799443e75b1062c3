"""Writes the small random models and reference logits under testdata/arch/.

Run once with torch and transformers installed (outside the project):
    python testdata/arch/make_references.py
Each model directory gets reference.json: a right-padded batch, logits[:, :, :8], the logsumexp of
every position, and the loss, all from transformers in float32 on CPU.
"""
import json
import pathlib

import torch
import transformers

HERE = pathlib.Path(__file__).parent
COMMON = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
MODELS = {
    "qwen2": transformers.Qwen2Config(**COMMON, rope_theta=1e6, tie_word_embeddings=False),
    "qwen3": transformers.Qwen3Config(**COMMON, head_dim=32, rope_theta=1e6, tie_word_embeddings=True),
    "llama3-scaled-tied": transformers.LlamaConfig(
        **COMMON, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=64),
    ),
}

torch.manual_seed(0)
input_ids = torch.randint(3, 512, (2, 40))
attention_mask = torch.ones_like(input_ids)
attention_mask[1, 25:] = 0
input_ids[1, 25:] = 0
labels = input_ids.clone()
labels[:, :10] = -100
labels[attention_mask == 0] = -100

for name, config in MODELS.items():
    config.torch_dtype = torch.float32
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so they are exercised.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or "bias" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    out_dir = HERE / name
    model.save_pretrained(out_dir, safe_serialization=True)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    ref = {
        "batch": {
            "input_ids": input_ids.tolist(),
            "attention_mask": attention_mask.tolist(),
            "labels": labels.tolist(),
        },
        "logits_first8": out.logits[:, :, :8].tolist(),
        "logsumexp": torch.logsumexp(out.logits, dim=-1).tolist(),
        "loss": out.loss.item(),
        "generator": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (out_dir / "reference.json").write_text(json.dumps(ref))
    print(name, out.loss.item())
