//! UMT5's tokenizer as Wan's pipelines call it: the prompt first goes
//! through the pipeline's `prompt_clean` (HTML unescaping, whitespace
//! collapse), then the Unigram tokenizer of the folder's `tokenizer.json`
//! with `padding="max_length"`, `truncation=True`, special tokens (`</s>`
//! appended) and the attention mask.
//!
//! The tokenizer itself is the `tokenizers` crate that transformers runs,
//! loaded from the very file transformers loads, so normalisation
//! (sentencepiece's precompiled character map), pre-tokenisation
//! (Metaspace) and the `</s>` template come from the file, not from code
//! here.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::html;
use crate::error::{EngineError, LoadError, Result};

/// The `max_sequence_length` Wan's pipelines pass (`__call__`'s default).
pub const UMT5_MAX_LENGTH: usize = 512;

/// UMT5's padding token (`<pad>`, id 0 in UMT5's vocabulary).
const PAD_TOKEN: &str = "<pad>";
/// The end-of-sequence token appended to every prompt (id 1).
const EOS_TOKEN: &str = "</s>";
/// The unknown-piece token (id 2), which the tokenizer emits for pieces
/// outside the vocabulary.
const UNK_TOKEN: &str = "<unk>";

pub struct Umt5Tokenizer {
    inner: tokenizers::Tokenizer,
    pad_id: u32,
    eos_id: u32,
    path: PathBuf,
}

/// Prompts as the text encoder takes them: `[N, max_length]` row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Umt5Tokens {
    pub input_ids: Vec<u32>,
    /// 1 for the prompt's tokens (with `</s>`), 0 for padding.
    pub attention_mask: Vec<u32>,
    /// Each prompt's own length, the mask's row sum: the pipeline keeps this
    /// many text embeddings and zeroes the rest.
    pub lengths: Vec<usize>,
    pub max_length: usize,
}

impl Umt5Tokenizer {
    /// Loads a `tokenizer/` folder's `tokenizer.json`, or, where the
    /// folder has only `spiece.model`, what transformers builds from it.
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join("tokenizer.json");
        let spiece = dir.join("spiece.model");
        if !path.is_file() && spiece.is_file() {
            let bytes = std::fs::read(&spiece).map_err(|source| LoadError::Io {
                path: spiece.clone(),
                source,
            })?;
            return Self::from_sentencepiece(&bytes, &spiece);
        }
        if !path.is_file() {
            return Err(LoadError::Layout {
                path: dir.to_path_buf(),
                message: "no tokenizer.json nor spiece.model: a UMT5 tokenizer folder holds \
                          tokenizer.json (the tokenizers-library file transformers saves) or \
                          spiece.model (SentencePiece)"
                    .into(),
            });
        }
        Self::from_file(&path)
    }

    /// Loads a `tokenizer.json` as transformers 5's `T5Tokenizer` does: it
    /// keeps the file's Unigram vocabulary (with `unk_id` 2, no byte
    /// fallback), its added tokens and sentencepiece's precompiled character
    /// map, and rebuilds the rest: normaliser = the charsmap alone (a
    /// hub file's extra `Replace(" {2,}", " ")` is dropped), pre-tokenizer =
    /// WhitespaceSplit then Metaspace (`▁`, prepended always), post-processor
    /// = `$A </s>`.
    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        let config_error = |message: String| LoadError::Config {
            path: path.to_path_buf(),
            message,
        };
        // Plain serde_json: the vocabulary is finite numbers, and a piece
        // such as "NaN" must stay a string.
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| config_error(format!("not valid JSON: {e}")))?;
        Self::from_json(json, path, None)
    }

    /// The tokenizer transformers 5's `T5Tokenizer` builds from a bare
    /// SentencePiece model (`spiece.model`, or the `spiece_model` tensor of
    /// a ComfyUI UMT5 file): `origin` names where the bytes came from.
    pub fn from_sentencepiece(bytes: &[u8], origin: &Path) -> Result<Self, LoadError> {
        let bad = |message: String| LoadError::Config {
            path: origin.to_path_buf(),
            message,
        };
        let model = super::sentencepiece::parse(bytes).map_err(bad)?;
        let precompiled = match model.precompiled_charsmap.is_empty() {
            true => None,
            false => Some(
                tokenizers::normalizers::Precompiled::from(&model.precompiled_charsmap).map_err(
                    |e| {
                        bad(format!(
                            "the SentencePiece normaliser's charsmap does not read: {e}"
                        ))
                    },
                )?,
            ),
        };
        Self::from_json(
            super::sentencepiece::t5_tokenizer_json(&model),
            origin,
            precompiled,
        )
    }

    /// A tokenizers-library JSON rebuilt as described at [`Self::from_file`];
    /// `precompiled` replaces the file's normaliser.
    fn from_json(
        mut json: Value,
        path: &Path,
        precompiled: Option<tokenizers::normalizers::Precompiled>,
    ) -> Result<Self, LoadError> {
        let config_error = |message: String| LoadError::Config {
            path: path.to_path_buf(),
            message,
        };
        let model_type = json["model"]["type"].as_str().unwrap_or("(none)");
        if model_type != "Unigram" {
            return Err(config_error(format!(
                "`model.type` is \"{model_type}\": expected \"Unigram\" (UMT5's sentencepiece vocabulary)"
            )));
        }
        let pad_id = token_id(&json, PAD_TOKEN).ok_or_else(|| {
            config_error(format!(
                "no `{PAD_TOKEN}` token: expected UMT5's vocabulary (`{PAD_TOKEN}` = 0)"
            ))
        })?;
        let eos_id = token_id(&json, EOS_TOKEN).ok_or_else(|| {
            config_error(format!(
                "no `{EOS_TOKEN}` token: expected UMT5's vocabulary (`{EOS_TOKEN}` = 1)"
            ))
        })?;
        if token_id(&json, UNK_TOKEN).is_none() {
            return Err(config_error(format!(
                "no `{UNK_TOKEN}` token: expected UMT5's vocabulary (`{UNK_TOKEN}` = 2)"
            )));
        }
        let charsmap = precompiled_charsmap(&json["normalizer"]);
        json["model"]["unk_id"] = json!(2);
        json["model"]["byte_fallback"] = json!(false);
        json["normalizer"] = match charsmap {
            Some(map) => json!({"type": "Precompiled", "precompiled_charsmap": map}),
            None => Value::Null,
        };
        json["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
            {"type": "WhitespaceSplit"},
            {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "always", "split": true}
        ]});
        let sequence = |id: &str| json!({"Sequence": {"id": id, "type_id": 0}});
        let eos = json!({"SpecialToken": {"id": EOS_TOKEN, "type_id": 0}});
        json["post_processor"] = json!({
            "type": "TemplateProcessing",
            "single": [sequence("A"), eos],
            "pair": [sequence("A"), eos, sequence("B"), eos],
            "special_tokens": {EOS_TOKEN: {"id": EOS_TOKEN, "ids": [eos_id], "tokens": [EOS_TOKEN]}}
        });
        // Padding and truncation are the call's (transformers sets them per
        // call, `encode` applies them), whatever the file was saved with.
        json["padding"] = Value::Null;
        json["truncation"] = Value::Null;
        let mut inner: tokenizers::Tokenizer = serde_json::from_value(json).map_err(|e| {
            config_error(format!("not a tokenizers-library Unigram tokenizer: {e}"))
        })?;
        if let Some(precompiled) = precompiled {
            inner
                .with_normalizer(Some(precompiled))
                .map_err(|e| config_error(format!("the normaliser does not apply: {e}")))?;
        }
        Ok(Self {
            inner,
            pad_id,
            eos_id,
            path: path.to_path_buf(),
        })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The largest token id of the vocabulary, T5's `<extra_id_N>`
    /// sentinels left out: what must fit the text encoder's embedding table.
    /// transformers appends 100 sentinels to a bare SentencePiece model
    /// whether or not the table has rows for them (they are T5's
    /// pre-training masks, not prompt text), and a prompt that spells one
    /// past the table is refused when it is encoded.
    pub fn max_id(&self) -> u32 {
        self.inner
            .get_vocab(true)
            .into_iter()
            .filter(|(token, _)| !(token.starts_with("<extra_id_") && token.ends_with('>')))
            .map(|(_, id)| id)
            .max()
            .unwrap_or(self.eos_id.max(self.pad_id))
    }

    /// The `tokenizer.json` it was read from, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pipeline's tokenizer call: each prompt through [`prompt_clean`],
    /// then tokenized with `</s>`, truncated to `max_length` (`</s>` kept
    /// last) and padded to it with `<pad>`.
    pub fn encode<S: AsRef<str>>(&self, prompts: &[S], max_length: usize) -> Result<Umt5Tokens> {
        if max_length < 2 {
            return Err(EngineError::Argument {
                op: "umt5 tokenizer",
                message: format!(
                    "max_length {max_length}: expected at least 2 (one token and `</s>`)"
                ),
            });
        }
        let mut tokens = Umt5Tokens {
            input_ids: Vec::with_capacity(prompts.len() * max_length),
            attention_mask: Vec::with_capacity(prompts.len() * max_length),
            lengths: Vec::with_capacity(prompts.len()),
            max_length,
        };
        for prompt in prompts {
            let cleaned = prompt_clean(prompt.as_ref());
            let encoding = self
                .inner
                .encode(cleaned.as_str(), true)
                .map_err(|e| self.error(format!("prompt {cleaned:?}: {e}")))?;
            let ids = encoding.get_ids();
            // transformers' truncation of one sequence keeps the first
            // L − 1 tokens, then the template appends `</s>`: the same as
            // cutting the tokens before our template's `</s>`.
            let len = ids.len().min(max_length);
            if ids.len() > max_length {
                tokens.input_ids.extend_from_slice(&ids[..max_length - 1]);
                tokens.input_ids.push(self.eos_id);
            } else {
                tokens.input_ids.extend_from_slice(ids);
            }
            tokens
                .input_ids
                .extend(std::iter::repeat_n(self.pad_id, max_length - len));
            tokens.attention_mask.extend(std::iter::repeat_n(1, len));
            tokens
                .attention_mask
                .extend(std::iter::repeat_n(0, max_length - len));
            tokens.lengths.push(len);
        }
        Ok(tokens)
    }

    fn error(&self, message: String) -> EngineError {
        LoadError::Config {
            path: self.path.clone(),
            message,
        }
        .into()
    }
}

/// The id of `token`: an added token's, else its index in the Unigram
/// vocabulary (a list of `[piece, score]`).
fn token_id(json: &Value, token: &str) -> Option<u32> {
    let added = json["added_tokens"].as_array().and_then(|list| {
        list.iter()
            .find(|t| t["content"].as_str() == Some(token))
            .and_then(|t| t["id"].as_u64())
    });
    let id = added.or_else(|| {
        json["model"]["vocab"]
            .as_array()?
            .iter()
            .position(|entry| entry[0].as_str() == Some(token))
            .map(|i| i as u64)
    })?;
    u32::try_from(id).ok()
}

/// sentencepiece's character map, from a `Precompiled` normaliser alone or
/// inside a `Sequence` (transformers' `convert_to_native_format`).
fn precompiled_charsmap(normalizer: &Value) -> Option<Value> {
    let candidates = match normalizer["type"].as_str() {
        Some("Sequence") => normalizer["normalizers"].as_array()?.clone(),
        _ => vec![normalizer.clone()],
    };
    candidates
        .into_iter()
        .find(|n| n["type"].as_str() == Some("Precompiled"))
        .and_then(|n| n.get("precompiled_charsmap").cloned())
}

/// Wan's `prompt_clean` without ftfy (the references are made without it):
/// `html.unescape` twice (so `&amp;lt;` becomes `<`), then every run of
/// whitespace to one space and the ends stripped.
pub fn prompt_clean(text: &str) -> String {
    let text = html::unescape(&html::unescape(text));
    // basic_clean's strip, whitespace_clean's `re.sub(r"\s+", " ")` and
    // strip come to: collapse the runs, drop them at the ends.
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in text.chars() {
        if is_python_space(c) {
            pending_space = !out.is_empty();
        } else {
            if pending_space {
                out.push(' ');
                pending_space = false;
            }
            out.push(c);
        }
    }
    out
}

/// Python's `str.isspace`, which `\s` in a str pattern and `str.strip()`
/// use: Unicode White_Space plus the four information separators
/// U+001C–U+001F (bidirectional class B/S), which Rust's
/// `char::is_whitespace` leaves out.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected values from Python 3.11:
    /// `whitespace_clean(basic_clean(s))` with ftfy absent.
    #[test]
    fn prompt_clean_matches_python() {
        for (input, expected) in [
            ("a cat", "a cat"),
            ("  a \t\n cat  ", "a cat"),
            ("a\u{3000}\u{a0}\u{2009}cat\u{85}", "a cat"),
            ("a\u{1c}\u{1d}\u{1e}\u{1f}cat", "a cat"),
            // Not whitespace in Python: zero-width space, U+180E.
            ("a\u{200b}b\u{180e}c", "a\u{200b}b\u{180e}c"),
            ("Tom &amp; Jerry", "Tom & Jerry"),
            ("&amp;lt;b&amp;gt;", "<b>"),
            ("&amp;amp;", "&"),
            ("&amp;amp;amp;", "&amp;"),
            ("it&#39;s &quot;fine&quot;", "it's \"fine\""),
            ("caf&eacute; &#x263A;", "café ☺"),
            ("a&nbsp;&nbsp;b", "a b"),
            ("&#10;&#32;x&#9;", "x"),
            ("", ""),
            (" \n\t ", ""),
        ] {
            assert_eq!(prompt_clean(input), expected, "input {input:?}");
        }
    }

    #[test]
    fn python_whitespace_is_exactly_str_isspace() {
        // Python 3.11: [c for c in range(0x110000) if chr(c).isspace()].
        let python: Vec<u32> = [
            0x9, 0xa, 0xb, 0xc, 0xd, 0x1c, 0x1d, 0x1e, 0x1f, 0x20, 0x85, 0xa0, 0x1680, 0x2000,
            0x2001, 0x2002, 0x2003, 0x2004, 0x2005, 0x2006, 0x2007, 0x2008, 0x2009, 0x200a, 0x2028,
            0x2029, 0x202f, 0x205f, 0x3000,
        ]
        .to_vec();
        let ours: Vec<u32> = (0..=0x10ffffu32)
            .filter_map(char::from_u32)
            .filter(|&c| is_python_space(c))
            .map(|c| c as u32)
            .collect();
        assert_eq!(ours, python);
    }

    #[test]
    fn a_folder_without_tokenizer_json_names_it() {
        let dir = std::env::temp_dir().join(format!("motif-umt5-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let message = match Umt5Tokenizer::from_dir(&dir) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("expected an error"),
        };
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            message.contains(&dir.display().to_string())
                && message.contains("tokenizer.json")
                && message.contains("spiece.model"),
            "{message}"
        );
    }
}
