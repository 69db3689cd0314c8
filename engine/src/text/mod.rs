//! Text: the CLIP tokenizer (and, with the models issue, the text encoder).

pub mod tokenizer;

pub use tokenizer::ClipTokenizer;
