//! Datasets, chat templates and tokenization, token for token as LLaMA-Factory produces them.
