//! Settings whose value is one of a fixed set of names, typed as the YAML is read: a wrong name
//! fails there, in a sentence that names the key and the names it takes.

use std::fmt;

use crate::error::ConfigError;

/// A setting whose value is one of a fixed set of names.
pub trait Choice: Copy + 'static {
    /// Every name, in the order an error lists them.
    const NAMES: &'static [&'static str];

    fn from_name(name: &str) -> Option<Self>;

    /// The name a config file gives this value.
    fn name(self) -> &'static str;

    /// The error for `got`, which is none of [`NAMES`](Self::NAMES).
    fn refuse(key: &str, got: &str) -> ConfigError {
        ConfigError::OutOfRange {
            key: key.into(),
            got: format!("`{got}`"),
            range: format!("one of {}", Self::NAMES.join(", ")),
        }
    }
}

/// Declares a [`Choice`] enum from its variants and their names; items after the variants
/// (such as its own `refuse`) go into its `Choice` impl.
macro_rules! choice {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$variant_meta:meta])* $variant:ident = $text:literal, )+ }
        $($choice_items:tt)*
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $( $(#[$variant_meta])* $variant, )+
        }

        impl Choice for $name {
            const NAMES: &'static [&'static str] = &[$($text),+];

            fn from_name(name: &str) -> Option<Self> {
                match name {
                    $( $text => Some(Self::$variant), )+
                    _ => None,
                }
            }

            fn name(self) -> &'static str {
                match self {
                    $( Self::$variant => $text, )+
                }
            }

            $($choice_items)*
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

choice! {
    /// `stage`: what kind of training runs. LLaMA-Factory's other stages (pt, rm, ppo, dpo, kto)
    /// are not supported.
    Stage {
        /// Supervised fine-tuning.
        Sft = "sft",
    }

    fn refuse(_key: &str, got: &str) -> ConfigError {
        ConfigError::Invalid(format!(
            "stage `{got}` is not supported; ferrofactory trains stage sft only"
        ))
    }
}

choice! {
    /// `finetuning_type`: which weights train.
    FinetuningType {
        /// Low-rank adapters beside the frozen Linear layers.
        Lora = "lora",
        /// Every weight.
        Full = "full",
        /// The chosen modules of the last `freeze_trainable_layers` decoder layers.
        Freeze = "freeze",
    }
}

choice! {
    /// `lr_scheduler_type`: transformers' learning-rate schedules; their parameters come from
    /// `lr_scheduler_kwargs`.
    LrSchedulerType {
        Linear = "linear",
        Cosine = "cosine",
        CosineWithRestarts = "cosine_with_restarts",
        Polynomial = "polynomial",
        Constant = "constant",
        ConstantWithWarmup = "constant_with_warmup",
        CosineWithMinLr = "cosine_with_min_lr",
    }
}

choice! {
    /// `optim`: transformers' names of its AdamW implementations, which all train as the one
    /// AdamW here.
    Optimizer {
        AdamwTorch = "adamw_torch",
        AdamwTorchFused = "adamw_torch_fused",
        AdamwHf = "adamw_hf",
    }
}

choice! {
    /// `save_strategy` and `eval_strategy`: when to checkpoint or evaluate, as transformers'
    /// `IntervalStrategy`.
    IntervalStrategy {
        No = "no",
        /// Every `save_steps` or `eval_steps` steps.
        Steps = "steps",
        /// At the end of each epoch.
        Epoch = "epoch",
    }
}

choice! {
    /// `quantization_type`: the 4-bit code table of QLoRA.
    QuantizationType {
        /// Normal float.
        Nf4 = "nf4",
        /// Floating point.
        Fp4 = "fp4",
    }
}

choice! {
    /// `quantization_method`: whose quantization; bitsandbytes' layouts only.
    QuantizationMethod {
        Bitsandbytes = "bitsandbytes",
    }
}

choice! {
    /// `mix_strategy`: how several datasets make one; concatenation only.
    MixStrategy {
        Concat = "concat",
    }
}

choice! {
    /// `export_device`: where `export` merges; both mean this machine's CPU here.
    ExportDevice {
        Cpu = "cpu",
        Auto = "auto",
    }
}

choice! {
    /// An entry of `report_to`: the logging services of Python's ecosystem (wandb, tensorboard,
    /// ...) are not supported.
    ReportTo {
        None = "none",
    }
}
