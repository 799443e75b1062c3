//! The parts a decoder is walked in, and which part each parameter belongs to.

/// A piece of the decoder that computes as one: the embedding, a decoder layer (by its position
/// in [`crate::CausalLm::layers`]), or the head (final norm and language-model head; a head tied
/// to the embedding is the embedding's table, which belongs to [`Part::Embed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    Embed,
    Layer(usize),
    Head,
}
