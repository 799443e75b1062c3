//! Supervised fine-tuning examples: templated turns, cut to `cutoff_len`, with prompt tokens
//! masked out of the labels, following LLaMA-Factory's supervised processor.

use crate::convert::Conversation;
use crate::template::{Encoded, Template};
use crate::tokenizer::Tokenizer;

/// The label of a position the loss ignores.
pub const IGNORE_INDEX: i64 = -100;

/// One tokenized training example.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

#[derive(Clone, Copy, Debug)]
pub struct SupervisedOptions {
    pub cutoff_len: usize,
    pub train_on_prompt: bool,
    pub mask_history: bool,
}

/// How many source and target tokens to keep when a turn must fit in `cutoff_len` tokens: a
/// short side is kept whole, otherwise both shrink in proportion to their lengths.
pub fn infer_seqlen(source_len: usize, target_len: usize, cutoff_len: usize) -> (usize, usize) {
    let max_target_len = if target_len * 2 < cutoff_len {
        cutoff_len
    } else if source_len * 2 < cutoff_len {
        cutoff_len - source_len
    } else {
        (cutoff_len as f64 * (target_len as f64 / (source_len + target_len) as f64)) as usize
    };
    let new_target_len = max_target_len.min(target_len);
    let new_source_len = cutoff_len.saturating_sub(new_target_len).min(source_len);
    (new_source_len, new_target_len)
}

/// The example for `conversation`, `Ok(None)` when LLaMA-Factory drops it (an even number of
/// prompt messages, or not exactly one response), or why it cannot be encoded.
pub fn encode_example(
    conversation: &Conversation,
    template: &Template,
    tokenizer: &Tokenizer,
    options: SupervisedOptions,
) -> Encoded<Option<Example>> {
    if conversation.prompt.len() % 2 != 1 || conversation.response.len() != 1 {
        return Ok(None);
    }
    let mut messages = conversation.prompt.clone();
    messages.extend(conversation.response.iter().cloned());
    // With mask_history only the last answer is trained on, so earlier thoughts are dropped
    // unless the template preserves them.
    let discarding_history_cot = options.mask_history && !template.preserve_thinking;
    let mut pairs = template.encode_multiturn(
        tokenizer,
        &messages,
        &conversation.system,
        &conversation.tools,
        discarding_history_cot,
    )?;
    let eos = tokenizer.eos_token_id;
    let mut total_length = usize::from(template.efficient_eos);
    if options.mask_history {
        // The last turns get the budget first.
        pairs.reverse();
    }
    let mut input_ids: Vec<u32> = Vec::new();
    let mut labels: Vec<i64> = Vec::new();
    for (turn, (source, target)) in pairs.into_iter().enumerate() {
        if total_length >= options.cutoff_len {
            break;
        }
        let (source_len, target_len) = infer_seqlen(
            source.len(),
            target.len(),
            options.cutoff_len - total_length,
        );
        let source = &source[..source_len];
        let target = &target[..target_len];
        total_length += source_len + target_len;
        let source_label: Vec<i64> = if options.train_on_prompt {
            source.iter().map(|&t| i64::from(t)).collect()
        } else if template.efficient_eos && turn != 0 {
            // The previous answer's EOS is learned at the start of the next prompt.
            let eos = eos.ok_or("the tokenizer has no EOS token")?;
            std::iter::once(i64::from(eos))
                .chain(std::iter::repeat_n(
                    IGNORE_INDEX,
                    source_len.saturating_sub(1),
                ))
                .collect()
        } else {
            vec![IGNORE_INDEX; source_len]
        };
        let target_label: Vec<i64> = if options.mask_history && turn != 0 {
            vec![IGNORE_INDEX; target_len]
        } else {
            target.iter().map(|&t| i64::from(t)).collect()
        };
        let turn_ids = source.iter().chain(target).copied();
        let turn_labels = source_label.into_iter().chain(target_label);
        if options.mask_history {
            input_ids.splice(0..0, turn_ids);
            labels.splice(0..0, turn_labels);
        } else {
            input_ids.extend(turn_ids);
            labels.extend(turn_labels);
        }
    }
    if template.efficient_eos {
        let eos = eos.ok_or("the tokenizer has no EOS token")?;
        input_ids.push(eos);
        labels.push(i64::from(eos));
    }
    Ok(Some(Example { input_ids, labels }))
}

#[cfg(test)]
mod tests {
    use super::infer_seqlen;

    #[test]
    fn seqlen_keeps_short_sides_whole_and_splits_long_ones_in_proportion() {
        assert_eq!(infer_seqlen(10, 20, 100), (10, 20));
        assert_eq!(infer_seqlen(10, 200, 100), (10, 90));
        assert_eq!(infer_seqlen(200, 10, 100), (90, 10));
        assert_eq!(infer_seqlen(300, 100, 100), (75, 25));
    }
}
