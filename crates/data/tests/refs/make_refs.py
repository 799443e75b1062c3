"""Writes the reference files in this folder with LLaMA-Factory 0.9.5's own preprocessing.

Each case runs LLaMA-Factory's `get_dataset` (loading, converting, merging, splitting and the
supervised processor) with the SmolLM2 tokenizer from testdata/smollm2-135m-config and writes
`<case>.jsonl`: a first line {"config": {...}} in ff-data's DataArgs key names, then one line
{"input_ids": [...], "labels": [...]} per training example; when the case has an evaluation set,
`<case>.eval.jsonl` holds its examples the same way (without the config line).

PyTorch is not needed for data preprocessing: when torch or peft is not installed, small stand-ins
for torch, torchaudio and peft are written to a temporary folder to let LLaMA-Factory's modules
import. Setup (outside the project):

    python3 -m venv /tmp/lf-data
    /tmp/lf-data/bin/pip install --no-deps llamafactory==0.9.5
    /tmp/lf-data/bin/pip install "transformers==5.6.0" "datasets==4.0.0" omegaconf jinja2
    DISABLE_VERSION_CHECK=1 /tmp/lf-data/bin/python crates/data/tests/refs/make_refs.py

The llama3 tool prompt contains today's date; cases that use it pin the date to TOOL_DATE.
"""

import contextlib
import datetime as real_datetime
import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace


HERE = Path(__file__).resolve().parent
CRATE = HERE.parent.parent
ROOT = CRATE.parent.parent
TOKENIZER = ROOT / "testdata" / "smollm2-135m-config"
TOOL_DATE = (2026, 1, 15)

STUB = """
import sys, types
class _Dummy:
    def __init__(self, *a, **k): pass
    def __call__(self, *a, **k): return _Dummy()
    def __getattr__(self, name): return _Dummy
    def __bool__(self): return False
def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Dummy
for sub in ["distributed", "nn", "nn.functional", "utils", "utils.data", "cuda", "backends",
            "backends.mps", "npu", "xpu", "optim", "optim.lr_scheduler"]:
    m = types.ModuleType(__name__ + "." + sub)
    m.__getattr__ = __getattr__
    sys.modules[__name__ + "." + sub] = m
    parent = sys.modules[(__name__ + "." + sub).rsplit(".", 1)[0]]
    setattr(parent, sub.rsplit(".", 1)[-1], m)
__version__ = "N/A"
"""

PEFT_STUB = """
import sys, types
def __getattr__(name):
    return object
utils = types.ModuleType("peft.utils")
utils.SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
utils.WEIGHTS_NAME = "adapter_model.bin"
sys.modules["peft.utils"] = utils
__version__ = "0.18.0"
"""


def install_stubs() -> None:
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401

        return  # the real packages are there
    except ImportError:
        pass
    stub_dir = Path(tempfile.mkdtemp(prefix="lf-stubs-"))
    for name, text in [("torch", STUB), ("torchaudio", STUB), ("peft", PEFT_STUB)]:
        (stub_dir / name).mkdir()
        (stub_dir / name / "__init__.py").write_text(textwrap.dedent(text))
    sys.path.insert(0, str(stub_dir))


# name, config (DataArgs keys; dataset_dir "data" is the repository's, "tests" this crate's)
TEMPLATES = [
    "empty", "default", "alpaca", "chatml", "qwen", "qwen3", "qwen3_nothink", "llama2", "llama3",
    "mistral", "gemma", "phi", "smollm2", "deepseek", "yi", "vicuna", "zephyr", "breeze", "bailing",
]
CASES = []
for template in TEMPLATES:
    CASES.append((f"{template}__chat", dict(dataset="chat_multiturn,alpaca_history,messages_folder",
                                             dataset_dir="tests", template=template, cutoff_len=1024)))
    # Llama2-style templates format function calls without thought words, so LLaMA-Factory rejects
    # the thought-prefixed and <tool_call>-tagged calls of tool_calls_tagged for them.
    tools = "tool_calls" if template in ("llama2", "mistral", "gemma") else "tool_calls,tool_calls_tagged"
    CASES.append((f"{template}__tools", dict(dataset=tools, dataset_dir="tests", template=template,
                                              cutoff_len=1024)))
CASES += [
    ("qwen3__thinking", dict(dataset="thinking", dataset_dir="tests", template="qwen3", cutoff_len=1024)),
    ("qwen3__thinking_off", dict(dataset="thinking", dataset_dir="tests", template="qwen3", cutoff_len=1024,
                                 enable_thinking=False)),
    ("qwen3__thinking_mask_history", dict(dataset="thinking", dataset_dir="tests", template="qwen3",
                                          cutoff_len=1024, mask_history=True)),
    ("qwen3_nothink__thinking", dict(dataset="thinking", dataset_dir="tests", template="qwen3_nothink",
                                     cutoff_len=1024)),
    ("qwen__mask_history_cutoff", dict(dataset="chat_multiturn", dataset_dir="tests", template="qwen",
                                       cutoff_len=64, mask_history=True)),
    ("llama3__cutoff_100", dict(dataset="chat_multiturn,alpaca_history", dataset_dir="tests", template="llama3",
                                cutoff_len=100)),
    ("smollm2__train_on_prompt", dict(dataset="chat_multiturn,alpaca_history", dataset_dir="tests",
                                      template="smollm2", cutoff_len=256, train_on_prompt=True)),
    ("zephyr__default_system", dict(dataset="chat_multiturn", dataset_dir="tests", template="zephyr",
                                    cutoff_len=1024, default_system="Custom default system.")),
    ("chatml__tool_format_qwen", dict(dataset="tool_calls", dataset_dir="tests", template="chatml",
                                      cutoff_len=1024, tool_format="qwen")),
    ("gemma__tool_format_mistral", dict(dataset="tool_calls", dataset_dir="tests", template="gemma",
                                        cutoff_len=1024, tool_format="mistral")),
    ("qwen__glaive", dict(dataset="glaive_toolcall_en_demo", dataset_dir="data", template="qwen",
                          cutoff_len=512, max_samples=60)),
    ("default__glaive", dict(dataset="glaive_toolcall_en_demo", dataset_dir="data", template="default",
                             cutoff_len=512, max_samples=30)),
    ("llama3__glaive", dict(dataset="glaive_toolcall_en_demo", dataset_dir="data", template="llama3",
                            cutoff_len=1024, max_samples=20)),
    ("mistral__glaive", dict(dataset="glaive_toolcall_en_demo", dataset_dir="data", template="mistral",
                             cutoff_len=1024, max_samples=20)),
    ("smollm2__val_fraction", dict(dataset="alpaca_en_demo,identity", dataset_dir="data", template="smollm2",
                                   cutoff_len=128, max_samples=50, val_size=0.1, seed=42)),
    ("smollm2__val_count", dict(dataset="identity", dataset_dir="data", template="smollm2",
                                cutoff_len=128, val_size=7, seed=1234)),
    ("alpaca__eval_dataset", dict(dataset="alpaca_en_demo", eval_dataset="identity", dataset_dir="data",
                                  template="alpaca", cutoff_len=128, max_samples=10)),
    ("llama2__alpaca_zh", dict(dataset="alpaca_zh_demo", dataset_dir="data", template="llama2",
                               cutoff_len=200, max_samples=20)),
    ("qwen3__thinking_mask_history_preserve", dict(dataset="thinking", dataset_dir="tests", template="qwen3",
                                                   cutoff_len=1024, mask_history=True, preserve_thinking=True)),
    ("qwen3__thinking_off_mask_history", dict(dataset="thinking,chat_multiturn", dataset_dir="tests",
                                              template="qwen3", cutoff_len=48, mask_history=True,
                                              enable_thinking=False)),
    ("phi__mask_history_cutoff", dict(dataset="chat_multiturn", dataset_dir="tests", template="phi",
                                      cutoff_len=80, mask_history=True)),
    ("breeze__mask_history_cutoff", dict(dataset="chat_multiturn,tool_calls", dataset_dir="tests",
                                         template="breeze", cutoff_len=40, mask_history=True)),
    # The split happens before broken rows are dropped, so each part loses its own.
    ("chatml__val_with_broken_rows", dict(dataset="chat_multiturn,alpaca_history", dataset_dir="tests",
                                          template="chatml", cutoff_len=512, val_size=0.3, seed=3)),
    # num_samples draws from NumPy's global generator, seeded by transformers.set_seed(seed).
    ("smollm2__num_samples", dict(dataset="chat_resampled,alpaca_oversampled", dataset_dir="tests",
                                  template="smollm2", cutoff_len=256, seed=7)),
    ("smollm2__num_samples_split", dict(dataset="alpaca_oversampled", eval_dataset="chat_resampled",
                                        dataset_dir="tests", template="smollm2", cutoff_len=256,
                                        max_samples=10)),
    # No template: LLaMA-Factory derives one from the tokenizer's chat template.
    ("tokenizer_template__chat", dict(dataset="chat_multiturn,alpaca_history,messages_folder",
                                      dataset_dir="tests", template=None, cutoff_len=1024)),
    ("tokenizer_template__tools", dict(dataset="tool_calls,tool_calls_tagged", dataset_dir="tests",
                                       template=None, cutoff_len=1024)),
    ("tokenizer_template_think__thinking", dict(dataset="thinking,chat_multiturn", dataset_dir="tests",
                                                template=None, cutoff_len=1024, chat_template="think.jinja")),
]


def run_case(name: str, config: dict) -> None:
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.data import template as template_module
    from llamafactory.data import tool_utils
    from llamafactory.hparams.data_args import DataArguments
    import transformers
    from transformers import AutoTokenizer

    dataset_dir = str(ROOT / "data") if config["dataset_dir"] == "data" else str(CRATE / "tests" / "data")
    data_args = DataArguments(
        template=config["template"],
        dataset=config["dataset"],
        eval_dataset=config.get("eval_dataset"),
        dataset_dir=dataset_dir,
        cutoff_len=config["cutoff_len"],
        max_samples=config.get("max_samples"),
        train_on_prompt=config.get("train_on_prompt", False),
        mask_history=config.get("mask_history", False),
        val_size=config.get("val_size", 0.0),
        default_system=config.get("default_system"),
        enable_thinking=config.get("enable_thinking", True),
        preserve_thinking=config.get("preserve_thinking", False),
        tool_format=config.get("tool_format"),
        overwrite_cache=True,
        preprocessing_num_workers=None,
    )
    training_args = SimpleNamespace(
        seed=config.get("seed", 42),
        main_process_first=lambda desc, local: contextlib.nullcontext(),
        should_log=False,
        should_save=False,
        predict_with_generate=False,
        local_process_index=0,
        dataloader_num_workers=0,
    )
    model_args = SimpleNamespace(cache_dir=None, hf_hub_token=None, ms_hub_token=None, om_hub_token=None)

    class FixedDate(real_datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(*TOOL_DATE)

    tool_utils.datetime = FixedDate
    # Templates are module-level objects that get_template_and_fix_tokenizer mutates; start fresh.
    import copy

    saved = copy.deepcopy(template_module.TEMPLATES.get(config["template"]))
    tokenizer_dir = TOKENIZER
    if config.get("chat_template"):
        # SmolLM2's tokenizer with another chat template.
        tokenizer_dir = Path(tempfile.mkdtemp(prefix="lf-tokenizer-"))
        for file_name in ["tokenizer.json", "tokenizer_config.json"]:
            (tokenizer_dir / file_name).write_bytes((TOKENIZER / file_name).read_bytes())
        template_file = CRATE / "tests" / "data" / "chat_templates" / config["chat_template"]
        (tokenizer_dir / "chat_template.jinja").write_bytes(template_file.read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    # LLaMA-Factory's get_train_args ends with transformers.set_seed(training seed).
    transformers.set_seed(training_args.seed)
    module = get_dataset(template, model_args, data_args, training_args, "sft", tokenizer)
    if saved is not None:
        template_module.TEMPLATES[config["template"]] = saved

    full_config = dict(config)
    full_config.setdefault("seed", 42)
    with open(HERE / f"{name}.jsonl", "w") as f:
        f.write(json.dumps({"config": full_config}, ensure_ascii=False) + "\n")
        for example in module["train_dataset"]:
            f.write(json.dumps({"input_ids": example["input_ids"], "labels": example["labels"]}) + "\n")
    eval_dataset = module.get("eval_dataset")
    if eval_dataset is not None:
        with open(HERE / f"{name}.eval.jsonl", "w") as f:
            for example in eval_dataset:
                f.write(json.dumps({"input_ids": example["input_ids"], "labels": example["labels"]}) + "\n")
    print(f"{name}: {len(module['train_dataset'])} train"
          + (f", {len(eval_dataset)} eval" if eval_dataset is not None else ""))


def main() -> None:
    os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
    os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="lf-datasets-"))
    install_stubs()
    import datasets

    datasets.disable_caching()
    only = set(sys.argv[1:])
    for name, config in CASES:
        if not only or name in only:
            run_case(name, config)


if __name__ == "__main__":
    main()
