use ff_config::{
    ConfigError, ExportDevice, FinetuningType, IntervalStrategy, LrSchedulerType, Optimizer,
    ReportTo, TrainArgs,
};

fn parse(yaml: &str, overrides: &[&str]) -> Result<TrainArgs, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.yaml");
    std::fs::write(&path, yaml).unwrap();
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    TrainArgs::load(&path, &overrides)
}

const EXAMPLE: &str = "\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
";

#[test]
fn llama_factory_example_reads_as_written() {
    let args = parse(EXAMPLE, &[]).unwrap();
    assert_eq!(args.dataset.0, ["identity", "alpaca_en_demo"]);
    assert_eq!(args.learning_rate, 1e-4);
    assert_eq!(args.gradient_accumulation_steps, 8);
    assert!(args.bf16 && args.plot_loss);
    assert_eq!(args.lora_alpha(), 16.0);
    assert_eq!(args.resume_from_checkpoint, None);
    args.require_for_training().unwrap();
}

#[test]
fn overrides_replace_file_values_with_typed_conversion() {
    let args = parse(
        EXAMPLE,
        &[
            "learning_rate=2e-5",
            "lora_rank=16",
            "bf16=false",
            "template=qwen",
        ],
    )
    .unwrap();
    assert_eq!(args.learning_rate, 2e-5);
    assert_eq!(args.lora_rank, 16);
    assert!(!args.bf16);
    assert_eq!(args.template.as_deref(), Some("qwen"));
    let message = parse(EXAMPLE, &["lora_rank"]).unwrap_err().to_string();
    assert!(
        message.contains("override `lora_rank` must be written key=value"),
        "{message}"
    );
}

#[test]
fn numbers_written_as_strings_are_numbers() {
    let args = parse("learning_rate: 1e-4\nwarmup_ratio: '0.05'\n", &[]).unwrap();
    assert_eq!(args.learning_rate, 1e-4);
    assert_eq!(args.warmup_ratio, 0.05);
}

#[test]
fn unknown_key_names_it_and_the_closest() {
    let message = parse("learnig_rate: 1.0e-4\n", &[])
        .unwrap_err()
        .to_string();
    assert_eq!(
        message,
        "unknown key `learnig_rate`; did you mean `learning_rate`?"
    );
    let message = parse("frobnicate: 3\n", &[]).unwrap_err().to_string();
    assert_eq!(message, "unknown key `frobnicate`");
}

#[test]
fn values_out_of_range_name_key_and_range() {
    let message = parse("lora_dropout: 1.5\n", &[]).unwrap_err().to_string();
    assert_eq!(message, "`lora_dropout` is 1.5 but must be in [0, 1)");
    let message = parse("lr_scheduler_type: exotic\n", &[])
        .unwrap_err()
        .to_string();
    assert!(
        message.starts_with("`lr_scheduler_type` is `exotic` but must be one of linear"),
        "{message}"
    );
    let message = parse("per_device_train_batch_size: two\n", &[])
        .unwrap_err()
        .to_string();
    assert_eq!(
        message,
        "`per_device_train_batch_size` must be a non-negative integer, got 'two'"
    );
}

#[test]
fn other_stages_and_unsupported_features_are_refused() {
    let message = parse("stage: dpo\n", &[]).unwrap_err().to_string();
    assert_eq!(
        message,
        "stage `dpo` is not supported; ferrofactory trains stage sft only"
    );
    let message = parse("deepspeed: ds_z3_config.json\n", &[])
        .unwrap_err()
        .to_string();
    assert!(
        message
            .starts_with("`deepspeed` is a LLaMA-Factory key that ferrofactory does not support"),
        "{message}"
    );
    let message = parse("bf16: true\nfp16: true\n", &[])
        .unwrap_err()
        .to_string();
    assert!(message.contains("choose one"), "{message}");
}

#[test]
fn missing_required_keys_are_named() {
    let args = parse("dataset: identity\n", &[]).unwrap();
    let message = args.require_for_training().unwrap_err().to_string();
    assert!(
        message.contains("`model_name_or_path` is required"),
        "{message}"
    );
}

#[test]
fn bad_yaml_names_the_file() {
    let message = parse("a: [1,\n", &[]).unwrap_err().to_string();
    assert!(
        message.contains("train.yaml is not valid YAML"),
        "{message}"
    );
}

#[test]
fn quantization_bit_4_and_8_for_lora_only() {
    let base = "model_name_or_path: m\nfinetuning_type: lora\n";
    let args = parse(base, &["quantization_bit=4", "quantization_type=fp4"]).unwrap();
    assert_eq!(args.quantization_bit, Some(4));
    assert!(args.double_quantization);
    assert!(parse(base, &["quantization_bit=8"]).is_ok());
    let err = parse(base, &["quantization_bit=3"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("takes 4 or 8 bits"), "{err}");
    let err = parse(base, &["quantization_bit=4", "quantization_type=int4"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("quantization_type"), "{err}");
    let err = parse(base, &["quantization_bit=4", "finetuning_type=full"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("finetuning_type lora only"), "{err}");
    let err = parse(base, &["quantization_bit=4", "quantization_method=hqq"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("quantization_method"), "{err}");
}

#[test]
fn export_keys_parse_and_unsupported_ones_are_refused_with_a_reason() {
    let base = "model_name_or_path: m\nexport_dir: out\n";
    let args = parse(base, &[]).unwrap();
    assert_eq!(args.export_size, 5);
    args.require_for_export().unwrap();
    let err = parse(base, &["export_legacy_format=true"])
        .unwrap()
        .require_for_export()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("export_legacy_format") && err.contains(".bin"),
        "{err}"
    );
    let err = parse(base, &["adapter_name_or_path=a", "quantization_bit=4"])
        .unwrap()
        .require_for_export()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot merge adapters into a quantized model"),
        "{err}"
    );
    let err = parse("model_name_or_path: m\n", &[])
        .unwrap()
        .require_for_export()
        .unwrap_err()
        .to_string();
    assert!(err.contains("export_dir"), "{err}");
}

#[test]
fn enumerated_keys_read_as_their_values_and_wrong_names_fail_when_read() {
    let args = parse(
        "finetuning_type: freeze\neval_strategy: epoch\nsave_strategy: 'no'\noptim: adamw_torch_fused\nreport_to: [none]\nexport_device: auto\n",
        &["lr_scheduler_type=cosine_with_restarts"],
    )
    .unwrap();
    assert_eq!(args.finetuning_type, FinetuningType::Freeze);
    assert_eq!(args.eval_strategy, IntervalStrategy::Epoch);
    assert_eq!(args.save_strategy, IntervalStrategy::No);
    assert_eq!(args.optim, Optimizer::AdamwTorchFused);
    assert_eq!(args.report_to, [ReportTo::None]);
    assert_eq!(args.export_device, ExportDevice::Auto);
    assert_eq!(args.lr_scheduler_type, LrSchedulerType::CosineWithRestarts);
    for (yaml, message) in [
        (
            "save_strategy: best\n",
            "`save_strategy` is `best` but must be one of no, steps, epoch",
        ),
        (
            "finetuning_type: LoRA\n",
            "`finetuning_type` is `LoRA` but must be one of lora, full, freeze",
        ),
        (
            "report_to: none,wandb\n",
            "`report_to` is `wandb` but must be one of none",
        ),
        (
            "export_device: cuda\n",
            "`export_device` is `cuda` but must be one of cpu, auto",
        ),
        (
            "optim: [adamw_torch]\n",
            "`optim` must be a string, got - adamw_torch",
        ),
    ] {
        let error = parse(yaml, &[]).unwrap_err().to_string();
        assert_eq!(error, message, "{yaml}");
    }
}
