//! LLaMA-family decoder on candle.
