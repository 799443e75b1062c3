//! Typed training and launch configuration: LLaMA-Factory's YAML keys and accelerate's
//! config files, parsed, overridden with `key=value` and validated before any work starts.

pub mod choices;
pub mod error;
pub mod fsdp;
pub mod launch;
pub mod train_args;
pub mod value;

pub use choices::{
    Choice, ExportDevice, FinetuningType, IntervalStrategy, LrSchedulerType, MixStrategy,
    Optimizer, QuantizationMethod, QuantizationType, ReportTo, Stage,
};
pub use error::ConfigError;
pub use fsdp::{
    AutoWrapPolicy, BackwardPrefetch, FsdpConfig, ShardingStrategy, StateDictType, FSDP_ENV_VAR,
};
pub use launch::{
    default_launch_file, DistributedType, LaunchConfig, MixedPrecision, LAUNCH_KEYS_WITHOUT_EFFECT,
};
pub use train_args::{TrainArgs, KEYS_WITHOUT_EFFECT};
pub use value::CommaList;
