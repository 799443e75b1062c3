"""QLoRA reference steps with bitsandbytes' generic 4-bit dequantization on CPU.

Run: python make_qlora_reference.py TESTDATA_DIR > tiny-llama-qlora-reference-generic-dequant.json
(torch, transformers 5, peft 0.21 and bitsandbytes 0.50.2 from PyPI; the optimizer, LoRA and
quantization keys were then copied from tiny-llama-qlora-reference.json, which this mirrors).

bitsandbytes 0.50.2's CPU dequantize_4bit kernel indexes absmax per row (row * (n // 64) + j // 64),
while its quantizer blocks the flattened weight; for in_features not a multiple of 64 (the tiny
fixture's down_proj, 176) the two disagree. This script re-registers the CPU kernel with
bitsandbytes' own generic implementation (flattened blocks, used for odd shapes) and reruns the
fixture's QLoRA trajectories.
"""
import json, sys, torch
import bitsandbytes
from bitsandbytes._ops import register_kernel
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from bitsandbytes.backends.utils import _get_4bit_code

@register_kernel("bitsandbytes::dequantize_4bit", "cpu")
def _(A, absmax, blocksize, quant_type, shape, dtype):
    if A.dtype != torch.uint8:
        A = A.view(torch.uint8)
    return _dequantize_4bit_compute(A.reshape(-1), absmax, _get_4bit_code(quant_type, A.device), blocksize, shape, dtype)

from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from peft import PeftModel
T = sys.argv[1]
ref = json.load(open(f'{T}/tiny-llama-reference.json'))
b = ref['batch']
ids = torch.tensor(b['input_ids']); am = torch.tensor(b['attention_mask']); labels = torch.tensor(b['labels'])
out = {"generator": {"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__,
                     "note": "bitsandbytes' generic 4-bit dequantization on CPU (see testdata/make_qlora_reference.py)"},
       "qlora_adamw_steps": {}}
for name, dq in [("single", False), ("double_quant", True)]:
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=dq)
    m = AutoModelForCausalLM.from_pretrained(f'{T}/tiny-llama', quantization_config=q, dtype=torch.float32)
    m = PeftModel.from_pretrained(m, f'{T}/tiny-llama-lora-init', is_trainable=True)
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    steps = []
    for step in range(5):
        logits = m(input_ids=ids, attention_mask=am).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(); loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        steps.append({"step": step + 1, "loss": loss.item(), "grad_norm": gn.item()})
    out["qlora_adamw_steps"][name] = steps
print(json.dumps(out, indent=1))
