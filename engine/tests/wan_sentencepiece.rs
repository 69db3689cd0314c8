//! The UMT5 tokenizer built from a bare SentencePiece model equals what
//! transformers 5's T5Tokenizer builds from it (its SentencePiece
//! converter), on a prompt corpus with unicode, numbers and whitespace, as
//! the Wan pipelines call it (prompt_clean, padding, truncation, `</s>`):
//! references by tools/fixtures/make_spm_reference.py for a model trained
//! with PyPI's sentencepiece and for wan-a's spiece.model.

use std::path::{Path, PathBuf};

use motif_engine::text::Umt5Tokenizer;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

#[derive(serde::Deserialize)]
struct Reference {
    prompts: Vec<String>,
    max_length: usize,
    input_ids: Vec<Vec<u32>>,
    attention_mask: Vec<Vec<u32>>,
}

fn check(model: &Path, reference: &str) {
    let reference: Reference = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("wan-files").join(reference)).unwrap(),
    )
    .unwrap();
    let bytes = std::fs::read(model).unwrap();
    let tokenizer = Umt5Tokenizer::from_sentencepiece(&bytes, model).unwrap();
    let got = tokenizer
        .encode(&reference.prompts, reference.max_length)
        .unwrap();
    let l = reference.max_length;
    for (i, prompt) in reference.prompts.iter().enumerate() {
        assert_eq!(
            &got.input_ids[i * l..(i + 1) * l],
            &reference.input_ids[i][..],
            "ids of {prompt:?} ({})",
            model.display()
        );
        assert_eq!(
            &got.attention_mask[i * l..(i + 1) * l],
            &reference.attention_mask[i][..],
            "mask of {prompt:?}"
        );
    }
}

#[test]
fn a_trained_sentencepiece_model_tokenizes_as_transformers_converts_it() {
    check(
        &fixtures().join("wan-files/spm-trained.model"),
        "spm-trained.json",
    );
}

#[test]
fn wan_a_spiece_model_tokenizes_as_transformers_converts_it() {
    check(
        &fixtures().join("wan-a/tokenizer/spiece.model"),
        "spm-wan-a.json",
    );
}

#[test]
fn a_blob_that_is_not_a_sentencepiece_model_is_refused_naming_its_source() {
    let origin = Path::new("text_encoders/umt5_xxl.safetensors");
    for blob in [
        &b"not a protobuf \xff\xff\xff"[..],
        &[],
        &[0x0a, 0x02, 0x0a],
    ] {
        let e = Umt5Tokenizer::from_sentencepiece(blob, origin)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains("umt5_xxl.safetensors") && e.contains("SentencePiece"),
            "{e}"
        );
    }
    // A real model cut short.
    let bytes = std::fs::read(fixtures().join("wan-files/spm-trained.model")).unwrap();
    let e = Umt5Tokenizer::from_sentencepiece(&bytes[..bytes.len() / 2], origin)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("SentencePiece"), "{e}");
}
