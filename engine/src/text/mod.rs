//! Text: the CLIP tokenizer of AnimateDiff's SD1.5 models and the UMT5
//! tokenizer of Wan, with the prompt cleaning Wan's pipelines apply.

pub mod html;
mod html_entities;
pub mod sentencepiece;
pub mod tokenizer;
pub mod umt5;

pub use tokenizer::ClipTokenizer;
pub use umt5::{prompt_clean, Umt5Tokenizer, Umt5Tokens, UMT5_MAX_LENGTH};
