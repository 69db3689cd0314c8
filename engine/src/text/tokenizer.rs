//! The CLIP tokenizer of Stable Diffusion 1.x: byte-level BPE from a
//! `tokenizer/` folder's `vocab.json` + `merges.txt`, 77 ids per prompt:
//! BOS 49406, up to 75 tokens, EOS 49407, padded with 49407.
//!
//! The BPE itself is the `tokenizers` crate (what transformers runs), set up
//! with exactly the pipeline transformers builds for `CLIPTokenizer`: NFC,
//! whitespace runs to one space, lowercase; split by CLIP's regex; byte-level
//! mapping; BPE with the `</w>` end-of-word suffix. A literal
//! `<|endoftext|>` in a prompt is the special token, as in transformers.

use std::path::{Path, PathBuf};

use crate::error::LoadError;
use crate::weights::config::read_json;

/// CLIP's context length.
pub const MAX_LENGTH: usize = 77;

/// CLIP's split pattern (from the original CLIP tokenizer): special tokens,
/// English contractions, letter runs, single digits, other symbol runs.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

const BUNDLED_VOCAB: &str = include_str!("../../../assets/clip_tokenizer/vocab.json");
const BUNDLED_MERGES: &str = include_str!("../../../assets/clip_tokenizer/merges.txt");

pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    /// The largest id of the vocabulary, and the file it comes from: the
    /// text encoder's embedding table must have a row for it.
    max_id: u32,
    vocab_path: PathBuf,
}

fn layout(path: &Path, message: impl Into<String>) -> LoadError {
    LoadError::Layout {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl ClipTokenizer {
    /// Loads a `tokenizer/` folder (`vocab.json` + `merges.txt`).
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        Self::from_files(&dir.join("vocab.json"), &dir.join("merges.txt"))
    }

    pub fn from_files(vocab_path: &Path, merges_path: &Path) -> Result<Self, LoadError> {
        let vocab = read_json(vocab_path)?;
        let text = std::fs::read_to_string(merges_path).map_err(|source| LoadError::Io {
            path: merges_path.to_path_buf(),
            source,
        })?;
        Self::from_parts(vocab, vocab_path, &text, merges_path)
    }

    /// SD1.x's own CLIP vocabulary, compiled into the binary: for single-file
    /// checkpoints, which carry no tokenizer.
    pub fn bundled() -> Result<Self, LoadError> {
        let vocab_path = Path::new("(bundled)/clip_tokenizer/vocab.json");
        let vocab = serde_json::from_str(BUNDLED_VOCAB).map_err(|e| LoadError::Config {
            path: vocab_path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_parts(
            vocab,
            vocab_path,
            BUNDLED_MERGES,
            Path::new("(bundled)/clip_tokenizer/merges.txt"),
        )
    }

    fn from_parts(
        vocab: serde_json::Value,
        vocab_path: &Path,
        text: &str,
        merges_path: &Path,
    ) -> Result<Self, LoadError> {
        let vocab_map = vocab
            .as_object()
            .ok_or_else(|| layout(vocab_path, "expected a JSON object of token -> id"))?;
        if vocab_map.values().any(|v| !v.is_u64()) {
            return Err(layout(
                vocab_path,
                "every id must be a non-negative integer",
            ));
        }
        let mut merges = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.starts_with("#version") || line.trim().is_empty() {
                continue;
            }
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                    merges.push(serde_json::json!([a, b]))
                }
                _ => {
                    return Err(layout(
                        merges_path,
                        format!(
                            "line {}: expected two tokens separated by a space, found `{line}`",
                            i + 1
                        ),
                    ))
                }
            }
        }
        // A byte-level BPE without merges tokenizes every word into single
        // bytes: it loads, but it is not the vocabulary any CLIP was trained
        // with (CLIP's has 48,894 merges).
        if merges.is_empty() {
            return Err(layout(
                merges_path,
                "no merges: expected CLIP's BPE merge list (one `a b` pair per line)",
            ));
        }
        let id = |token: &str, path: &Path| {
            vocab_map
                .get(token)
                .and_then(|v| v.as_u64())
                .map(|v| v as u32)
                .ok_or_else(|| layout(path, format!("missing the special token `{token}`")))
        };
        let bos = id("<|startoftext|>", vocab_path)?;
        let eos = id("<|endoftext|>", vocab_path)?;
        let max_id = vocab_map
            .values()
            .filter_map(|v| v.as_u64())
            .max()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| layout(vocab_path, "ids must fit in 32 bits"))?;
        let spec = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [
                {"id": bos, "content": "<|startoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": eos, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
                {"type": "Lowercase"}
            ]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": CLIP_PATTERN}, "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
            ]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": "<|endoftext|>",
                "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges
            }
        });
        let inner: tokenizers::Tokenizer = serde_json::from_value(spec).map_err(|e| {
            layout(
                merges_path,
                format!("vocab.json and merges.txt do not form a BPE tokenizer: {e}"),
            )
        })?;
        Ok(ClipTokenizer {
            inner,
            bos,
            eos,
            pad: eos,
            max_id,
            vocab_path: vocab_path.to_path_buf(),
        })
    }

    /// The largest token id this tokenizer can produce.
    pub fn max_id(&self) -> u32 {
        self.max_id
    }

    /// The vocabulary file (`vocab.json`), for messages.
    pub fn vocab_path(&self) -> &Path {
        &self.vocab_path
    }

    /// The folder's files, for messages.
    pub fn files(dir: &Path) -> [PathBuf; 2] {
        [dir.join("vocab.json"), dir.join("merges.txt")]
    }

    /// The tokens of `prompt` without BOS/EOS and without truncation.
    pub fn tokens(&self, prompt: &str) -> Vec<u32> {
        match self.inner.encode(prompt, false) {
            Ok(enc) => enc.get_ids().to_vec(),
            // The pipeline has no failing step for valid UTF-8 text; an empty
            // result is the safe answer if a future version adds one.
            Err(_) => Vec::new(),
        }
    }

    /// 77 ids: BOS, the first 75 tokens, EOS, then EOS padding (transformers'
    /// `padding="max_length", truncation=True`).
    pub fn encode(&self, prompt: &str) -> [u32; MAX_LENGTH] {
        let tokens = self.tokens(prompt);
        let mut ids = [self.pad; MAX_LENGTH];
        ids[0] = self.bos;
        let n = tokens.len().min(MAX_LENGTH - 2);
        ids[1..1 + n].copy_from_slice(&tokens[..n]);
        ids[1 + n] = self.eos;
        ids
    }

    /// How many tokens of `prompt` fit (for a "prompt truncated" warning).
    pub fn truncated(&self, prompt: &str) -> Option<usize> {
        let n = self.tokens(prompt).len();
        (n > MAX_LENGTH - 2).then_some(n)
    }
}
