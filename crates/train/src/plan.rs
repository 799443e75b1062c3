//! How one micro-batch runs: what the forward keeps for the backward, how much the loss's head
//! may hold, and in how many row groups its rows run. Decided here, in one place, from plain
//! numbers about the model and where the trained state lives ([`PlanInputs`]).

use candle_core::DType;
use ff_model::layers::Keep;
use ff_model::CausalLm;

use crate::loss::HeadMemory;

/// What the forward keeps for the layers' backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checkpointing {
    /// The whole graph (gradient checkpointing off); only the replicated engine runs this way.
    Off,
    /// Each layer's input, and the results [`Keeping`] names; the backward recomputes each
    /// layer but for those (gradient checkpointing).
    Layers(Keeping),
}

/// Which layers' results the first pass keeps beside their inputs (see
/// [`ff_model::layers::Keep`]): attention's for the topmost `attention_layers` layers, the MLP's
/// gate and up projections' for the topmost `mlp_layers`. The topmost, because the backward
/// frees their kept values first, while full fine-tuning's gradients grow layer by layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Keeping {
    pub attention_layers: usize,
    pub mlp_layers: usize,
}

impl Keeping {
    /// What layer `index` of `num_layers` keeps.
    pub fn of_layer(self, index: usize, num_layers: usize) -> Keep {
        let from_top = num_layers - index;
        Keep {
            attention: from_top <= self.attention_layers,
            mlp: from_top <= self.mlp_layers,
        }
    }
}

/// Values per token a layer's first pass can keep for its backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeptValues {
    pub attention: usize,
    pub mlp: usize,
}

/// The facts a micro-batch's plan is decided from.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanInputs {
    /// The run's `gradient_checkpointing` (on unless disabled).
    pub gradient_checkpointing: bool,
    /// Trained parameters whose gradients and AdamW moments this rank holds in memory, all of
    /// them: `None` when they are offloaded to disk or sharded across ranks.
    pub trained_in_memory: Option<usize>,
    /// Whether the language-model head (or the embedding it is tied to) trains.
    pub head_trains: bool,
    /// Whether the model computes in float32 on the CPU, where rows run in groups.
    pub float32_on_cpu: bool,
    /// Threads the step may run row groups on.
    pub threads: usize,
    /// What each layer can keep, bottom layer first.
    pub layers: Vec<KeptValues>,
}

impl PlanInputs {
    /// The facts of `model` beside the engine's `trained_in_memory`.
    pub fn of(
        model: &CausalLm,
        trained_in_memory: Option<usize>,
        gradient_checkpointing: bool,
        threads: usize,
    ) -> Self {
        let kept = |layer: &ff_model::DecoderLayer, attention, mlp| {
            layer.kept_values_per_token(Keep { attention, mlp })
        };
        Self {
            gradient_checkpointing,
            trained_in_memory,
            head_trains: model.lm_head_weight().is_trainable(),
            float32_on_cpu: model.device.is_cpu() && model.dtype == DType::F32,
            threads,
            layers: model
                .layers
                .iter()
                .map(|layer| KeptValues {
                    attention: kept(layer, true, false),
                    mlp: kept(layer, false, true),
                })
                .collect(),
        }
    }
}

/// How a micro-batch of a step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MicroBatchPlan {
    pub checkpointing: Checkpointing,
    pub head_memory: HeadMemory,
    /// Groups of rows that run forward and backward side by side (1: the rows run as one).
    pub row_groups: usize,
}

impl MicroBatchPlan {
    /// The plan for a micro-batch of `rows` rows and `tokens` tokens.
    pub fn new(inputs: &PlanInputs, rows: usize, tokens: usize) -> Self {
        Self {
            checkpointing: checkpointing(inputs, tokens),
            head_memory: head_memory(inputs),
            row_groups: row_groups(inputs, rows),
        }
    }
}

/// With gradient checkpointing, layers keep results while all that is kept takes at most a
/// quarter of the memory the optimizer's side of training holds anyway (a float32 weight, its
/// gradient and two AdamW moments, 16 bytes a trained parameter, when they live in memory on
/// this rank), attention's first, layer by layer from the top, then the MLP's. LoRA, offloaded
/// or sharded state, or long batches leave little room, and their layers are recomputed whole.
fn checkpointing(inputs: &PlanInputs, tokens: usize) -> Checkpointing {
    if !inputs.gradient_checkpointing {
        return Checkpointing::Off;
    }
    let mut budget = inputs.trained_in_memory.map_or(0, |n| 16 * n) / 4;
    let mut keeping_from_top = |values_per_token: fn(&KeptValues) -> usize| {
        inputs
            .layers
            .iter()
            .rev()
            .take_while(|layer| {
                let bytes = 4 * tokens * values_per_token(layer);
                let fits = bytes <= budget;
                if fits {
                    budget -= bytes;
                }
                fits
            })
            .count()
    };
    let attention_layers = keeping_from_top(|layer| layer.attention);
    let mlp_layers = keeping_from_top(|layer| layer.mlp);
    Checkpointing::Layers(Keeping {
        attention_layers,
        mlp_layers,
    })
}

/// The head is below the step's memory peak where it trains beside every gradient and AdamW
/// moment in memory: the peak comes later, with all of them.
fn head_memory(inputs: &PlanInputs) -> HeadMemory {
    if inputs.trained_in_memory.is_some() && inputs.head_trains {
        HeadMemory::BelowPeak
    } else {
        HeadMemory::Peak
    }
}

/// One group per thread for a float32 model on the CPU with its gradients in memory; one
/// otherwise: elsewhere groups raised the peak past what their speed was worth.
fn row_groups(inputs: &PlanInputs, rows: usize) -> usize {
    let splits = inputs.float32_on_cpu && inputs.trained_in_memory.is_some();
    if !splits || rows < 2 {
        return 1;
    }
    let per_group = rows.div_ceil(inputs.threads.clamp(1, rows));
    rows.div_ceil(per_group)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(trained_in_memory: Option<usize>) -> PlanInputs {
        PlanInputs {
            gradient_checkpointing: true,
            trained_in_memory,
            head_trains: true,
            float32_on_cpu: true,
            threads: 2,
            layers: vec![
                KeptValues {
                    attention: 10,
                    mlp: 30
                };
                3
            ],
        }
    }

    #[test]
    fn rows_split_into_one_group_per_thread_only_beside_state_in_memory() {
        assert_eq!(MicroBatchPlan::new(&inputs(Some(1)), 5, 5).row_groups, 2);
        assert_eq!(MicroBatchPlan::new(&inputs(Some(1)), 1, 5).row_groups, 1);
        assert_eq!(MicroBatchPlan::new(&inputs(None), 5, 5).row_groups, 1);
        let bf16 = PlanInputs {
            float32_on_cpu: false,
            ..inputs(Some(1))
        };
        assert_eq!(MicroBatchPlan::new(&bf16, 5, 5).row_groups, 1);
        let three = PlanInputs {
            threads: 3,
            ..inputs(Some(1))
        };
        // Two rows a group: the third group gets the fifth row.
        assert_eq!(MicroBatchPlan::new(&three, 5, 5).row_groups, 3);
        assert_eq!(MicroBatchPlan::new(&three, 4, 4).row_groups, 2);
    }

    #[test]
    fn the_head_is_below_the_peak_only_where_it_trains_beside_state_in_memory() {
        let plan = |inputs: &PlanInputs| MicroBatchPlan::new(inputs, 1, 1).head_memory;
        assert_eq!(plan(&inputs(Some(1))), HeadMemory::BelowPeak);
        assert_eq!(plan(&inputs(None)), HeadMemory::Peak);
        let frozen_head = PlanInputs {
            head_trains: false,
            ..inputs(Some(1))
        };
        assert_eq!(plan(&frozen_head), HeadMemory::Peak);
    }

    /// 100 parameters in memory give a budget of 400 bytes: at one token, attention's 40
    /// bytes a layer fit in all three layers and the MLP's 120 in two of them.
    #[test]
    fn layers_keep_results_from_the_top_while_a_quarter_of_the_state_holds_them() {
        let keeping = |attention_layers, mlp_layers| {
            Checkpointing::Layers(Keeping {
                attention_layers,
                mlp_layers,
            })
        };
        let plan = |inputs: &PlanInputs, tokens| MicroBatchPlan::new(inputs, 1, tokens);
        assert_eq!(plan(&inputs(Some(100)), 1).checkpointing, keeping(3, 2));
        assert_eq!(plan(&inputs(Some(100)), 4).checkpointing, keeping(2, 0));
        assert_eq!(plan(&inputs(None), 1).checkpointing, keeping(0, 0));
        let off = PlanInputs {
            gradient_checkpointing: false,
            ..inputs(Some(100))
        };
        assert_eq!(plan(&off, 1).checkpointing, Checkpointing::Off);
        let top_attention = Keeping {
            attention_layers: 1,
            mlp_layers: 0,
        };
        assert!(top_attention.of_layer(2, 3).attention);
        assert!(!top_attention.of_layer(1, 3).attention);
    }
}
