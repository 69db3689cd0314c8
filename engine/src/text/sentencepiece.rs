//! SentencePiece models (`spiece.model`, or the `spiece_model` byte tensor
//! inside ComfyUI's UMT5 files): a protobuf `ModelProto`, read with `prost`
//! through the subset of sentencepiece's `sentencepiece_model.proto` that a
//! tokenizer needs (field numbers as there; unknown fields are skipped, as
//! protobuf readers do). `prost` rather than a sentencepiece crate: the
//! maintained Rust sentencepiece crates bind the C++ library (a native
//! build), while this needs only the model's pieces and its normaliser's
//! character map, which the `tokenizers` crate then runs.
//!
//! [`t5_tokenizer_json`] builds from it what transformers 5's `T5Tokenizer`
//! builds from a bare `spiece.model` (`convert_slow_tokenizer`'s
//! SentencePiece extraction): the Unigram model over the pieces with their
//! scores, `<unk>` at id 2, then `<extra_id_99>` … `<extra_id_0>` appended
//! (score 0) as special tokens, with `<pad>`, `</s>`, `<unk>` special too.
//! The normaliser (the model's precompiled charsmap), pre-tokenizer and
//! `</s>` template are the ones `Umt5Tokenizer` sets for every UMT5
//! tokenizer.

use prost::Message;
use serde_json::{json, Value};

/// `ModelProto.SentencePiece`.
#[derive(Clone, PartialEq, Message)]
pub struct SentencePiece {
    #[prost(string, optional, tag = "1")]
    pub piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    pub score: Option<f32>,
    /// NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6.
    #[prost(int32, optional, tag = "3")]
    pub r#type: Option<i32>,
}

/// `TrainerSpec`, the fields read here.
#[derive(Clone, PartialEq, Message)]
pub struct TrainerSpec {
    /// UNIGRAM 1 (the default), BPE 2, WORD 3, CHAR 4.
    #[prost(int32, optional, tag = "3")]
    pub model_type: Option<i32>,
    #[prost(bool, optional, tag = "35")]
    pub byte_fallback: Option<bool>,
    #[prost(int32, optional, tag = "40")]
    pub unk_id: Option<i32>,
}

/// `NormalizerSpec`, the fields read here.
#[derive(Clone, PartialEq, Message)]
pub struct NormalizerSpec {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub precompiled_charsmap: Option<Vec<u8>>,
}

/// `ModelProto`, the fields read here.
#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    #[prost(message, repeated, tag = "1")]
    pub pieces: Vec<SentencePiece>,
    #[prost(message, optional, tag = "2")]
    pub trainer_spec: Option<TrainerSpec>,
    #[prost(message, optional, tag = "3")]
    pub normalizer_spec: Option<NormalizerSpec>,
}

/// The sentinel tokens transformers' `T5Tokenizer` appends (`extra_ids`,
/// 100 by default) when the model does not hold them.
const T5_EXTRA_IDS: usize = 100;

/// A parsed model: pieces with scores, and the normaliser's charsmap.
#[derive(Debug, Clone)]
pub struct SentencePieceModel {
    pub pieces: Vec<(String, f32)>,
    pub precompiled_charsmap: Vec<u8>,
}

/// Parses `bytes` as a Unigram SentencePiece model with T5's special
/// pieces; the error says what is wrong, for a message naming the source.
pub fn parse(bytes: &[u8]) -> Result<SentencePieceModel, String> {
    let proto = ModelProto::decode(bytes)
        .map_err(|e| format!("not a SentencePiece model (protobuf ModelProto): {e}"))?;
    if proto.pieces.is_empty() {
        return Err("not a SentencePiece model: it holds no pieces".into());
    }
    let trainer = proto.trainer_spec.unwrap_or_default();
    match trainer.model_type.unwrap_or(1) {
        1 => {}
        other => {
            return Err(format!(
            "a SentencePiece model of type {other} (2 BPE, 3 word, 4 char): UMT5's is Unigram (1)"
        ))
        }
    }
    if trainer.byte_fallback == Some(true) {
        return Err("a SentencePiece model with byte fallback: UMT5's has none".into());
    }
    let mut pieces = Vec::with_capacity(proto.pieces.len());
    for (i, p) in proto.pieces.into_iter().enumerate() {
        let piece = p
            .piece
            .ok_or_else(|| format!("not a SentencePiece model: piece {i} has no text"))?;
        pieces.push((piece, p.score.unwrap_or(0.0)));
    }
    // transformers' T5Tokenizer fixes these ids whatever the model says.
    for (id, want) in [(0, "<pad>"), (1, "</s>"), (2, "<unk>")] {
        if pieces[..].get(id).map(|(p, _)| p.as_str()) != Some(want) {
            return Err(format!(
                "piece {id} is {:?}: a UMT5/T5 SentencePiece model has `<pad>` 0, `</s>` 1, `<unk>` 2",
                pieces.get(id).map(|(p, _)| p.as_str())
            ));
        }
    }
    if trainer.unk_id.is_some_and(|u| u != 2) {
        return Err(format!(
            "unk_id is {:?}: a UMT5/T5 SentencePiece model has `<unk>` at 2",
            trainer.unk_id
        ));
    }
    let precompiled_charsmap = proto
        .normalizer_spec
        .and_then(|n| n.precompiled_charsmap)
        .unwrap_or_default();
    Ok(SentencePieceModel {
        pieces,
        precompiled_charsmap,
    })
}

/// The `tokenizer.json` (tokenizers library) of transformers 5's
/// `T5Tokenizer` over `model`, without its normaliser (the caller sets the
/// model's precompiled charsmap: it is raw bytes, not JSON).
pub fn t5_tokenizer_json(model: &SentencePieceModel) -> Value {
    let mut vocab: Vec<Value> = model.pieces.iter().map(|(p, s)| json!([p, s])).collect();
    let special = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let mut added: Vec<Value> = (0..3).map(|i| special(i, &model.pieces[i].0)).collect();
    let known: std::collections::HashMap<&str, usize> = model
        .pieces
        .iter()
        .enumerate()
        .map(|(i, (p, _))| (p.as_str(), i))
        .collect();
    for i in (0..T5_EXTRA_IDS).rev() {
        let token = format!("<extra_id_{i}>");
        let id = match known.get(token.as_str()) {
            Some(&id) => id,
            None => {
                vocab.push(json!([token, 0.0]));
                vocab.len() - 1
            }
        };
        added.push(special(id, &token));
    }
    json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": null,
        "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab, "byte_fallback": false},
    })
}
