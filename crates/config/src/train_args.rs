//! The training YAML: LLaMA-Factory's keys, meanings and defaults.

use std::path::Path;

use serde_yaml::{Mapping, Value};

use crate::choices::{
    ExportDevice, FinetuningType, IntervalStrategy, LrSchedulerType, MixStrategy, Optimizer,
    QuantizationMethod, QuantizationType, ReportTo, Stage,
};
use crate::error::{closest, ConfigError};
use crate::value::{read, render, CommaList};

/// Declares the supported keys once: the struct, its defaults and the key table come from it.
macro_rules! train_args {
    ($( $(#[doc = $doc:literal])* $field:ident : $ty:ty = $default:expr, )*) => {
        /// Every supported key of a training config. Field names are the YAML keys.
        #[derive(Clone, Debug, PartialEq)]
        pub struct TrainArgs {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        impl Default for TrainArgs {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        impl TrainArgs {
            /// The keys that change what ferrofactory does.
            pub const KEYS: &'static [&'static str] = &[$( stringify!($field), )*];

            fn set(&mut self, key: &str, value: &Value) -> Result<bool, ConfigError> {
                match key {
                    $( stringify!($field) => self.$field = read(key, value)?, )*
                    _ => return Ok(false),
                }
                Ok(true)
            }
        }
    };
}

train_args! {
    // Model.
    /// A Hugging Face model directory (config.json + safetensors).
    model_name_or_path: Option<String> = None,
    /// A PEFT adapter directory to continue training from.
    adapter_name_or_path: Option<String> = None,
    /// 4 or 8: quantize the frozen base for QLoRA (bitsandbytes' layouts).
    quantization_bit: Option<u64> = None,
    /// `nf4` or `fp4`, for 4 bits.
    quantization_type: QuantizationType = QuantizationType::Nf4,
    /// Quantize the 4-bit absmax statistics again (8 bits in blocks of 256).
    double_quantization: bool = true,
    quantization_method: QuantizationMethod = QuantizationMethod::Bitsandbytes,
    /// Keep the whole graph instead of recomputing each decoder layer in backward.
    disable_gradient_checkpointing: bool = false,

    // Export (read by `export`; `train` ignores them, as LLaMA-Factory does).
    /// Where `export` writes the merged model.
    export_dir: Option<String> = None,
    /// Shard size of the exported safetensors, in GB.
    export_size: u64 = 5,
    export_device: ExportDevice = ExportDevice::Cpu,
    export_legacy_format: bool = false,
    export_quantization_bit: Option<u64> = None,
    export_quantization_dataset: Option<String> = None,
    export_quantization_nsamples: u64 = 128,
    export_quantization_maxlen: u64 = 1024,
    export_hub_model_id: Option<String> = None,

    // Method.
    stage: Stage = Stage::Sft,
    do_train: bool = true,
    finetuning_type: FinetuningType = FinetuningType::Lora,
    lora_rank: u64 = 8,
    /// Defaults to twice `lora_rank`.
    lora_alpha: Option<f64> = None,
    lora_dropout: f64 = 0.0,
    lora_target: CommaList = CommaList(vec!["all".into()]),
    use_rslora: bool = false,
    use_dora: bool = false,
    pissa_init: bool = false,
    create_new_adapter: bool = false,
    additional_target: CommaList = CommaList::default(),
    freeze_trainable_layers: i64 = 2,
    freeze_trainable_modules: CommaList = CommaList(vec!["all".into()]),
    freeze_extra_modules: CommaList = CommaList::default(),

    // Data.
    dataset: CommaList = CommaList::default(),
    eval_dataset: CommaList = CommaList::default(),
    dataset_dir: String = "data".into(),
    template: Option<String> = None,
    cutoff_len: u64 = 2048,
    max_samples: Option<u64> = None,
    train_on_prompt: bool = false,
    mask_history: bool = false,
    /// A fraction below 1, or a number of examples.
    val_size: f64 = 0.0,
    default_system: Option<String> = None,
    enable_thinking: Option<bool> = Some(true),
    preserve_thinking: bool = false,
    tool_format: Option<String> = None,
    packing: Option<bool> = None,
    neat_packing: bool = false,
    streaming: bool = false,
    mix_strategy: MixStrategy = MixStrategy::Concat,
    tokenized_path: Option<String> = None,

    // Output.
    output_dir: Option<String> = None,
    overwrite_output_dir: bool = false,
    logging_steps: f64 = 500.0,
    save_strategy: IntervalStrategy = IntervalStrategy::Steps,
    save_steps: f64 = 500.0,
    save_total_limit: Option<u64> = None,
    save_only_model: bool = false,
    plot_loss: bool = false,
    report_to: Vec<ReportTo> = vec![ReportTo::None],

    // Optimisation.
    per_device_train_batch_size: u64 = 8,
    gradient_accumulation_steps: u64 = 1,
    learning_rate: f64 = 5e-5,
    num_train_epochs: f64 = 3.0,
    max_steps: i64 = -1,
    lr_scheduler_type: LrSchedulerType = LrSchedulerType::Linear,
    lr_scheduler_kwargs: Value = Value::Null,
    warmup_ratio: f64 = 0.0,
    warmup_steps: u64 = 0,
    weight_decay: f64 = 0.0,
    adam_beta1: f64 = 0.9,
    adam_beta2: f64 = 0.999,
    adam_epsilon: f64 = 1e-8,
    max_grad_norm: f64 = 1.0,
    optim: Optimizer = Optimizer::AdamwTorch,
    /// A folder on a local disk where gradients and AdamW moments live during training instead
    /// of memory, as DeepSpeed's NVMe offload keeps them (not with sharded FSDP; a ferrofactory
    /// key).
    offload_optimizer_dir: Option<String> = None,
    bf16: bool = false,
    fp16: bool = false,
    seed: u64 = 42,
    data_seed: Option<u64> = None,
    resume_from_checkpoint: Option<String> = None,

    // Evaluation.
    do_eval: bool = false,
    eval_strategy: IntervalStrategy = IntervalStrategy::No,
    eval_steps: Option<f64> = None,
    per_device_eval_batch_size: u64 = 8,

    // Distribution.
    /// Seconds a collective may wait for a peer before the job fails.
    ddp_timeout: u64 = 180_000_000,
}

/// Keys that tune Python machinery (workers, caches, kernels, logging back-ends); accepted so
/// LLaMA-Factory files run unchanged, and without effect here.
pub const KEYS_WITHOUT_EFFECT: &[&str] = &[
    "preprocessing_num_workers",
    "dataloader_num_workers",
    "dataloader_pin_memory",
    "dataloader_persistent_workers",
    "trust_remote_code",
    "overwrite_cache",
    "use_fast_tokenizer",
    "flash_attn",
    "use_unsloth",
    "use_unsloth_gc",
    "use_reentrant_gc",
    "enable_liger_kernel",
    "low_cpu_mem_usage",
    "cache_dir",
    "logging_dir",
    "logging_strategy",
    "run_name",
    "ddp_find_unused_parameters",
    "remove_unused_columns",
    "save_safetensors",
    "disable_tqdm",
    "log_level",
    "include_num_input_tokens_seen",
    "ignore_pad_token_for_loss",
    "infer_backend",
    "print_param_status",
    "hf_hub_token",
    "ms_hub_token",
    "om_hub_token",
    "torch_compile",
    "tf32",
];

/// LLaMA-Factory keys whose features ferrofactory lacks, with what to do instead.
const UNSUPPORTED_KEYS: &[(&str, &str)] = &[
    (
        "deepspeed",
        "use `ferrofactory launch` with an FSDP config file instead",
    ),
    (
        "rope_scaling",
        "set rope scaling in the model's config.json",
    ),
    ("pref_beta", "only stage sft is supported"),
    ("pref_loss", "only stage sft is supported"),
    ("reward_model", "only stage sft is supported"),
    ("image_max_pixels", "multimodal models are not supported"),
    ("video_max_pixels", "multimodal models are not supported"),
    ("freeze_vision_tower", "multimodal models are not supported"),
    ("use_galore", "only AdamW is supported"),
    ("use_badam", "only AdamW is supported"),
    ("use_apollo", "only AdamW is supported"),
    (
        "use_llama_pro",
        "freeze tuning without LLaMA Pro is supported",
    ),
    ("shift_attn", "not supported"),
    (
        "moe_aux_loss_coef",
        "mixture-of-experts models are not supported",
    ),
    (
        "fsdp",
        "use `ferrofactory launch --config_file` with an accelerate FSDP file",
    ),
];

impl TrainArgs {
    /// Reads a YAML (or JSON) file and applies `key=value` overrides, as `llamafactory-cli train`
    /// does, then validates the result.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_yaml::from_str(&text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mapping = match value {
            Value::Mapping(m) => m,
            Value::Null => Mapping::new(),
            _ => {
                return Err(ConfigError::NotAMapping {
                    path: path.to_path_buf(),
                })
            }
        };
        Self::from_mapping(mapping, overrides)
    }

    pub fn from_mapping(mut mapping: Mapping, overrides: &[String]) -> Result<Self, ConfigError> {
        for o in overrides {
            let (key, raw) = o
                .split_once('=')
                .filter(|(k, _)| !k.trim().is_empty())
                .ok_or_else(|| ConfigError::BadOverride(o.clone()))?;
            let value = serde_yaml::from_str::<Value>(raw).unwrap_or(Value::String(raw.into()));
            mapping.insert(Value::String(key.trim().to_string()), value);
        }
        let mut args = Self::default();
        for (key, value) in &mapping {
            let Some(key) = key.as_str() else {
                return Err(ConfigError::Invalid(format!(
                    "config keys must be strings, found {}",
                    render(key)
                )));
            };
            if args.set(key, value)? || KEYS_WITHOUT_EFFECT.contains(&key) {
                continue;
            }
            if let Some((_, hint)) = UNSUPPORTED_KEYS.iter().find(|(k, _)| *k == key) {
                return Err(ConfigError::UnsupportedKey {
                    key: key.to_string(),
                    hint: hint.to_string(),
                });
            }
            let known = Self::KEYS.iter().chain(KEYS_WITHOUT_EFFECT).copied();
            return Err(ConfigError::UnknownKey {
                key: key.to_string(),
                suggestion: closest(key, known),
            });
        }
        args.validate()?;
        Ok(args)
    }

    /// `lora_alpha`, defaulting to twice the rank as LLaMA-Factory does.
    pub fn lora_alpha(&self) -> f64 {
        self.lora_alpha.unwrap_or(2.0 * self.lora_rank as f64)
    }

    /// Checks every value on its own and against the others, before any work starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_unsupported()?;
        self.validate_quantization()?;
        self.validate_ranges()?;
        if self.bf16 && self.fp16 {
            return Err(ConfigError::Invalid(
                "bf16 and fp16 are both true; choose one compute precision".into(),
            ));
        }
        Ok(())
    }

    /// LLaMA-Factory features this build does not have, set by the user.
    fn validate_unsupported(&self) -> Result<(), ConfigError> {
        let unsupported = |key: &str, hint: &str| ConfigError::UnsupportedKey {
            key: key.into(),
            hint: hint.into(),
        };
        for (key, on) in [
            ("use_dora", self.use_dora),
            ("pissa_init", self.pissa_init),
            ("neat_packing", self.neat_packing),
            ("streaming", self.streaming),
            ("packing", self.packing == Some(true)),
        ] {
            if on {
                return Err(unsupported(key, "set it to false"));
            }
        }
        if self.tokenized_path.is_some() {
            return Err(unsupported("tokenized_path", "remove it"));
        }
        if !self.additional_target.is_empty() {
            return Err(unsupported(
                "additional_target",
                "remove it; only Linear layers inside decoder layers take adapters",
            ));
        }
        Ok(())
    }

    /// Every number within its range, checked in the order of the keys.
    fn validate_ranges(&self) -> Result<(), ConfigError> {
        let at_least_1 = |v: u64| (v as f64, v >= 1, "at least 1");
        let positive = |v: f64| (v, v > 0.0, "positive");
        let non_negative = |v: f64| (v, v >= 0.0, "0 or more");
        let below_1 = |v: f64| (v, (0.0..1.0).contains(&v), "in [0, 1)");
        let mut checks: Vec<(&str, (f64, bool, &str))> = vec![
            (
                "export_size",
                (
                    self.export_size as f64,
                    self.export_size >= 1,
                    "at least 1 (GB)",
                ),
            ),
            ("lora_rank", at_least_1(self.lora_rank)),
            ("lora_dropout", below_1(self.lora_dropout)),
        ];
        if let Some(alpha) = self.lora_alpha {
            checks.push(("lora_alpha", positive(alpha)));
        }
        checks.extend([
            ("cutoff_len", at_least_1(self.cutoff_len)),
            ("val_size", non_negative(self.val_size)),
            (
                "per_device_train_batch_size",
                at_least_1(self.per_device_train_batch_size),
            ),
            (
                "per_device_eval_batch_size",
                at_least_1(self.per_device_eval_batch_size),
            ),
            (
                "gradient_accumulation_steps",
                at_least_1(self.gradient_accumulation_steps),
            ),
            ("learning_rate", non_negative(self.learning_rate)),
        ]);
        if self.max_steps <= 0 {
            let epochs = self.num_train_epochs;
            checks.push((
                "num_train_epochs",
                (epochs, epochs > 0.0, "positive when max_steps is not set"),
            ));
        }
        let warmup = self.warmup_ratio;
        checks.extend([
            (
                "warmup_ratio",
                (warmup, (0.0..=1.0).contains(&warmup), "in [0, 1]"),
            ),
            ("weight_decay", non_negative(self.weight_decay)),
            ("adam_beta1", below_1(self.adam_beta1)),
            ("adam_beta2", below_1(self.adam_beta2)),
            ("adam_epsilon", positive(self.adam_epsilon)),
            (
                "max_grad_norm",
                (
                    self.max_grad_norm,
                    self.max_grad_norm >= 0.0,
                    "0 (no clipping) or more",
                ),
            ),
            ("logging_steps", positive(self.logging_steps)),
            ("save_steps", positive(self.save_steps)),
        ]);
        if let Some(steps) = self.eval_steps {
            checks.push(("eval_steps", positive(steps)));
        }
        let timeout = self.ddp_timeout;
        checks.push((
            "ddp_timeout",
            (timeout as f64, timeout >= 1, "at least 1 second"),
        ));
        match checks.into_iter().find(|(_, (_, ok, _))| !ok) {
            Some((key, (got, _, range))) => Err(ConfigError::OutOfRange {
                key: key.into(),
                got: got.to_string(),
                range: range.into(),
            }),
            None => Ok(()),
        }
    }

    /// quantization_bit as LLaMA-Factory accepts it with bitsandbytes: 4 (nf4 or fp4) or 8, on
    /// LoRA only, with a single adapter that is continued rather than stacked.
    fn validate_quantization(&self) -> Result<(), ConfigError> {
        let Some(bits) = self.quantization_bit else {
            return Ok(());
        };
        if bits != 4 && bits != 8 {
            return Err(ConfigError::Invalid(format!(
                "quantization_bit is {bits}, but bitsandbytes quantization takes 4 or 8 bits"
            )));
        }
        if self.finetuning_type != FinetuningType::Lora {
            return Err(ConfigError::Invalid(format!(
                "quantization_bit works with finetuning_type lora only (QLoRA), not `{}`; quantized weights cannot be trained",
                self.finetuning_type
            )));
        }
        if self.adapter_name_or_path.is_some() && self.create_new_adapter {
            return Err(ConfigError::Invalid(
                "create_new_adapter cannot stack a new adapter upon a quantized model; remove it to continue training the adapter".into(),
            ));
        }
        Ok(())
    }

    /// The checks `export` needs beyond [`validate`](Self::validate), with LLaMA-Factory's
    /// conditions; what ferrofactory cannot do yet is refused with the reason.
    pub fn require_for_export(&self) -> Result<(), ConfigError> {
        for (key, missing) in [
            ("model_name_or_path", self.model_name_or_path.is_none()),
            ("export_dir", self.export_dir.is_none()),
        ] {
            if missing {
                return Err(ConfigError::Invalid(format!(
                    "`{key}` is required to export; add it to the config or pass {key}=..."
                )));
            }
        }
        if self.adapter_name_or_path.is_some() && self.export_quantization_bit.is_some() {
            return Err(ConfigError::Invalid(
                "export_quantization_bit with adapter_name_or_path: merge the adapter first (export without export_quantization_bit), then quantize the merged model".into(),
            ));
        }
        if self.adapter_name_or_path.is_some() && self.quantization_bit.is_some() {
            return Err(ConfigError::Invalid(
                "cannot merge adapters into a quantized model; remove quantization_bit to merge into the float base".into(),
            ));
        }
        for (key, set, why) in [
            ("export_quantization_bit", self.export_quantization_bit.is_some(), "GPTQ quantization on export is not supported; export the float model"),
            ("export_legacy_format", self.export_legacy_format, "only safetensors is written; .bin (pickle) files are not supported, set it to false"),
            ("export_hub_model_id", self.export_hub_model_id.is_some(), "this machine cannot upload to the Hugging Face hub; remove it and upload export_dir yourself"),
            ("quantization_bit", self.quantization_bit.is_some(), "export writes a float model; remove it"),
        ] {
            if set {
                return Err(ConfigError::UnsupportedKey {
                    key: key.into(),
                    hint: why.into(),
                });
            }
        }
        if self.finetuning_type != FinetuningType::Lora && self.adapter_name_or_path.is_some() {
            return Err(ConfigError::Invalid(format!(
                "adapter_name_or_path works with finetuning_type lora only, not `{}`",
                self.finetuning_type
            )));
        }
        Ok(())
    }

    /// The checks `train` needs beyond [`validate`](Self::validate): the keys a run cannot do without.
    pub fn require_for_training(&self) -> Result<(), ConfigError> {
        for (key, missing) in [
            ("model_name_or_path", self.model_name_or_path.is_none()),
            ("output_dir", self.output_dir.is_none()),
            ("dataset", self.dataset.is_empty()),
        ] {
            if missing {
                return Err(ConfigError::Invalid(format!(
                    "`{key}` is required to train; add it to the config or pass {key}=..."
                )));
            }
        }
        if self.eval_strategy != IntervalStrategy::No
            && self.val_size == 0.0
            && self.eval_dataset.is_empty()
        {
            return Err(ConfigError::Invalid(format!(
                "eval_strategy is `{}` but there is nothing to evaluate on; set val_size or eval_dataset",
                self.eval_strategy
            )));
        }
        Ok(())
    }
}
