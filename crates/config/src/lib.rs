//! Typed training and launch configuration: LLaMA-Factory's YAML keys and accelerate's
//! config files, parsed, overridden with `key=value` and validated before any work starts.
