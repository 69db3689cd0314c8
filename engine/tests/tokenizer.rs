//! The CLIP tokenizer against transformers' ids for the reference prompts
//! (tests/fixtures/clip_tokenizer_reference.json, written by
//! tools/fixtures/clip_tokenizer.py from the real SD1.5 vocabulary).

use std::path::{Path, PathBuf};

use motif_engine::text::ClipTokenizer;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("engine/ has a parent")
        .to_path_buf()
}

fn tokenizer() -> ClipTokenizer {
    ClipTokenizer::from_dir(&root().join("assets/clip_tokenizer"))
        .expect("bundled CLIP tokenizer loads")
}

#[test]
fn ids_equal_transformers_on_every_reference_prompt() {
    let tok = tokenizer();
    let text = std::fs::read_to_string(root().join("tests/fixtures/clip_tokenizer_reference.json"))
        .unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 18);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let want: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(prompt).to_vec(), want, "prompt {prompt:?}");
    }
}

#[test]
fn long_prompts_are_truncated_to_bos_75_eos() {
    let tok = tokenizer();
    let long = "red ".repeat(100);
    let ids = tok.encode(&long);
    assert_eq!(ids[0], 49406);
    assert_eq!(ids[76], 49407);
    assert!(ids[1..76].iter().all(|&i| i != 49407));
    assert_eq!(tok.truncated(&long), Some(100));
    assert_eq!(tok.truncated("a red ball"), None);
}

#[test]
fn broken_tokenizer_files_name_the_file() {
    let dir = std::env::temp_dir().join(format!("motif-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    std::fs::write(
        &vocab,
        r#"{"a": 0, "b": 1, "ab": 2, "<|startoftext|>": 3, "<|endoftext|>": 4}"#,
    )
    .unwrap();
    std::fs::write(&merges, "#version: 0.2\na b\n").unwrap();
    assert!(ClipTokenizer::from_files(&vocab, &merges).is_ok());

    std::fs::write(&merges, "#version: 0.2\na b c\n").unwrap();
    let e = ClipTokenizer::from_files(&vocab, &merges)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("merges.txt") && e.contains("line 2"), "{e}");

    std::fs::write(&merges, "#version: 0.2\na b\n").unwrap();
    std::fs::write(&vocab, r#"{"a": 0, "b": 1"#).unwrap();
    let e = ClipTokenizer::from_files(&vocab, &merges)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("vocab.json") && e.contains("not valid JSON"),
        "{e}"
    );

    std::fs::write(&vocab, r#"{"a": 0, "b": 1, "ab": 2}"#).unwrap();
    let e = ClipTokenizer::from_files(&vocab, &merges)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("vocab.json") && e.contains("<|startoftext|>"),
        "{e}"
    );

    let e = ClipTokenizer::from_dir(&dir.join("nowhere"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("vocab.json"), "{e}");
}
