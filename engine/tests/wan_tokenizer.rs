//! UMT5's tokenizer as Wan's pipelines call it, against transformers 5:
//! every `tokenizer` case of the Wan reference case sets (ids and attention
//! mask exactly), the cleaned prompts the sets record, and the folder
//! errors.

use std::path::{Path, PathBuf};

use motif_engine::text::{prompt_clean, Umt5Tokenizer, UMT5_MAX_LENGTH};
use motif_engine::weights::SafetensorsFile;
use serde_json::Value;

fn case_sets() -> [PathBuf; 2] {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    [fixtures.join("wan-a"), fixtures.join("wan-b")]
}

/// A list input: a literal list, or `"prompts.json:KEY"`.
fn prompt_list(dir: &Path, value: &Value) -> Vec<String> {
    let list = match value.as_str().and_then(|s| s.strip_prefix("prompts.json:")) {
        Some(key) => {
            let prompts: Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("prompts.json")).unwrap())
                    .unwrap();
            prompts[key].clone()
        }
        None => value.clone(),
    };
    list.as_array()
        .expect("a list of prompts")
        .iter()
        .map(|p| p.as_str().expect("a prompt string").to_string())
        .collect()
}

#[test]
fn every_wan_tokenizer_case_matches_transformers() {
    let mut cases = 0;
    for dir in case_sets() {
        let manifest: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap())
                .unwrap();
        let tensors = SafetensorsFile::open(dir.join("cases.safetensors")).unwrap();
        let tokenizer = Umt5Tokenizer::from_dir(&dir.join("tokenizer")).unwrap();
        assert_eq!(tokenizer.pad_id(), 0);
        for case in manifest["cases"].as_array().unwrap() {
            if case["component"] != "tokenizer" {
                continue;
            }
            cases += 1;
            let name = case["name"].as_str().unwrap();
            let prompts = prompt_list(&dir, &case["inputs"]["prompts"]);
            let max_length = case["inputs"]["max_length"]
                .as_u64()
                .map_or(UMT5_MAX_LENGTH, |l| l as usize);
            if let Some(cleaned) = case.get("cleaned_prompts") {
                let cleaned = prompt_list(&dir, cleaned);
                for (prompt, expected) in prompts.iter().zip(&cleaned) {
                    assert_eq!(&prompt_clean(prompt), expected, "{name}: {prompt:?}");
                }
            }
            let tokens = tokenizer.encode(&prompts, max_length).unwrap();
            assert_eq!(tokens.input_ids.len(), prompts.len() * max_length);
            for output in case["outputs"].as_array().unwrap() {
                let out_name = output["name"].as_str().unwrap();
                let expected = tensors.to_i64(output["tensor"].as_str().unwrap()).unwrap();
                let got: Vec<i64> = match out_name {
                    "input_ids" => tokens.input_ids.iter().map(|&v| v as i64).collect(),
                    "attention_mask" => tokens.attention_mask.iter().map(|&v| v as i64).collect(),
                    other => panic!("{name}: unknown tokenizer output `{other}`"),
                };
                assert_eq!(got.len(), expected.len(), "{name} {out_name}");
                for (row, (g, e)) in got
                    .chunks(max_length)
                    .zip(expected.chunks(max_length))
                    .enumerate()
                {
                    assert_eq!(g, e, "{name} {out_name}, prompt {row}: {:?}", prompts[row]);
                }
            }
            // The lengths the pipeline trims the embeddings to.
            for (row, &len) in tokens.lengths.iter().enumerate() {
                let mask = &tokens.attention_mask[row * max_length..(row + 1) * max_length];
                assert_eq!(len, mask.iter().filter(|&&m| m == 1).count());
                assert_eq!(
                    tokens.input_ids[row * max_length + len - 1],
                    1,
                    "ends with </s>"
                );
            }
        }
    }
    assert_eq!(cases, 2);
}

#[test]
fn truncation_keeps_eos_last_at_any_length() {
    let tokenizer = Umt5Tokenizer::from_dir(&case_sets()[0].join("tokenizer")).unwrap();
    let prompt = "a red ball bouncing on grass, pixel art";
    let full = tokenizer.encode(&[prompt], 64).unwrap();
    let n = full.lengths[0];
    assert!(n > 4);
    let short = tokenizer.encode(&[prompt], 4).unwrap();
    assert_eq!(short.lengths, [4]);
    assert_eq!(short.input_ids[..3], full.input_ids[..3]);
    assert_eq!(short.input_ids[3], 1);
    assert_eq!(short.attention_mask, [1, 1, 1, 1]);
    // The empty prompt is `</s>` alone.
    let empty = tokenizer.encode(&[""], 3).unwrap();
    assert_eq!(
        (empty.input_ids, empty.attention_mask),
        (vec![1, 0, 0], vec![1, 0, 0])
    );
    assert!(tokenizer.encode(&[prompt], 1).is_err());
}

#[test]
fn bad_tokenizer_folders_are_refused_with_what_to_pass() {
    let dir = std::env::temp_dir().join(format!("motif-wan-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let error = |dir: &Path| match Umt5Tokenizer::from_dir(dir) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("expected an error"),
    };
    let message = error(&dir);
    assert!(
        message.contains(&dir.display().to_string()) && message.contains("tokenizer.json"),
        "{message}"
    );
    std::fs::write(dir.join("tokenizer.json"), "{not json").unwrap();
    assert!(error(&dir).contains("tokenizer.json"));
    // A BPE file (CLIP's, say) is not UMT5's.
    std::fs::write(
        dir.join("tokenizer.json"),
        r#"{"model": {"type": "BPE", "vocab": {}, "merges": []}}"#,
    )
    .unwrap();
    let message = error(&dir);
    assert!(message.contains("Unigram"), "{message}");
    std::fs::remove_dir_all(&dir).unwrap();
}
