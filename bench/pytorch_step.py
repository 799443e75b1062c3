"""One training step of PyTorch + transformers + PEFT on a SmolLM2-135M-shaped model with random
weights: the reference side of bench/pytorch_compare.sh (which says how to install it).

Same work as `ferrofactory bench step`: LoRA on every Linear of the decoder layers (or full
fine-tuning), labels on every token, AdamW, gradient clipping at 1.0, gradient checkpointing per
decoder layer as LLaMA-Factory enables it, one untimed warm-up step, then the median of --steps.
Prints `tokens/s X` and `peak RSS X GB` lines.
"""

import argparse
import resource
import statistics
import time
import warnings

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, LlamaForCausalLM


def main():
    # transformers 5 renames gradient checkpointing; the warnings would bury the figures.
    warnings.filterwarnings("ignore", category=FutureWarning)
    p = argparse.ArgumentParser()
    p.add_argument("--model-config", default="testdata/smollm2-135m-config")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--precision", choices=["float32", "bf16"], default="float32")
    p.add_argument("--finetuning", choices=["lora", "full"], default="lora")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    args = p.parse_args()

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    config = AutoConfig.from_pretrained(args.model_config)
    model = LlamaForCausalLM(config).to(dtype)
    if not args.no_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if args.finetuning == "lora":
        if not args.no_gradient_checkpointing:
            model.enable_input_require_grads()
        lora = LoraConfig(
            r=args.lora_rank,
            lora_alpha=2 * args.lora_rank,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
        model = get_peft_model(model, lora)
        # As LLaMA-Factory (and ferrofactory) do: trained tensors in float32, frozen ones in dtype.
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.0)

    generator = torch.Generator().manual_seed(0x5EED)
    input_ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=generator)
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        print(f"step {step}{' (warm-up)' if step == 0 else ''}: {seconds:.3f} s, loss {loss.item():.4f}", flush=True)
        if step > 0:
            times.append(seconds)

    median = statistics.median_low(times)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.precision} {args.finetuning}")
    print(f"median step {median:.3f} s")
    print(f"tokens/s {args.batch * args.seq / median:.1f}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
