//! `motif generate` on model folders with one file broken: copies of the
//! bundled default model (AnimateDiff) and of the tiny Wan folder
//! tests/fixtures/wan-a, each made in the test with one tensor removed or
//! cut, or one tokenizer file emptied or edited. Each must be refused before
//! any output file appears, with a message naming the tensor or file and
//! what was expected — never loaded with a guessed default in its place.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::{json, Map, Value};

mod common;

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A copy of the model folder `src` in a fresh temporary folder.
fn copy_model(src: &Path, name: &str) -> (PathBuf, PathBuf) {
    let work = common::temp_dir(name);
    let model = work.join("model");
    copy_dir(src, &model);
    (work, model)
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        // Followed, not copied as links: the bundled model's tokenizer is a
        // link to assets/clip_tokenizer, which the tests edit in the copy.
        if std::fs::metadata(entry.path()).unwrap().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
}

/// What to do with one tensor of a rewritten safetensors file.
enum Edit {
    Keep,
    Drop,
    /// Keep the first N rows (first dimension).
    Rows(usize),
}

/// Rewrites a safetensors file in place, each tensor edited by `edit(name)`.
fn rewrite_safetensors(path: &Path, edit: impl Fn(&str) -> Edit) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out_header = Map::new();
    let mut out_data = Vec::new();
    for (name, info) in &header {
        if name == "__metadata__" {
            out_header.insert(name.clone(), info.clone());
            continue;
        }
        let offsets: Vec<usize> = info["data_offsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let mut shape: Vec<usize> = info["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let mut tensor = &data[offsets[0]..offsets[1]];
        match edit(name) {
            Edit::Keep => {}
            Edit::Drop => continue,
            Edit::Rows(rows) => {
                let row_bytes = tensor.len() / shape[0];
                tensor = &tensor[..rows * row_bytes];
                shape[0] = rows;
            }
        }
        let start = out_data.len();
        out_data.extend_from_slice(tensor);
        out_header.insert(
            name.clone(),
            json!({"dtype": info["dtype"], "shape": shape, "data_offsets": [start, out_data.len()]}),
        );
    }
    let mut text = serde_json::to_vec(&Value::Object(out_header)).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&out_data);
    std::fs::write(path, out).unwrap();
}

/// Edits a JSON file in place.
fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut value: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

/// `motif generate` of a tiny clip from `model`, writing `work/clip.mp4`;
/// asserts it fails, names every one of `expected` on stderr, and leaves no
/// file but the model in `work`.
fn assert_refused(work: &Path, model: &Path, size: [&str; 3], expected: &[&str]) {
    let model = model.to_string_lossy().into_owned();
    let args = [
        "generate",
        "a red ball bouncing on grass",
        "--model",
        &model,
        "--width",
        size[0],
        "--height",
        size[1],
        "--frames",
        size[2],
        "--steps",
        "2",
        "-o",
        "clip.mp4",
    ];
    let out: Output = common::motif_command(&args, &[])
        .current_dir(work)
        .env_remove("MOTIF_MODEL")
        .env_remove("MOTIF_PRECISION")
        .output()
        .expect("motif runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a broken model generated a clip; stderr:\n{stderr}"
    );
    for word in expected {
        assert!(stderr.contains(word), "`{word}` not in stderr:\n{stderr}");
    }
    let left: Vec<_> = std::fs::read_dir(work)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "model")
        .collect();
    assert!(left.is_empty(), "files written by a refused run: {left:?}");
    let _ = std::fs::remove_dir_all(work);
}

const ANIMATEDIFF: [&str; 3] = ["24", "16", "3"];
const WAN: [&str; 3] = ["48", "32", "5"];

fn animatediff(name: &str) -> (PathBuf, PathBuf) {
    copy_model(&fixture("assets/models/default"), name)
}

fn wan(name: &str) -> (PathBuf, PathBuf) {
    copy_model(&fixture("tests/fixtures/wan-a"), name)
}

#[test]
fn a_unet_without_a_conv_bias_is_refused_naming_the_tensor_and_file() {
    let (work, model) = animatediff("conv-bias");
    let file = model.join("unet/diffusion_pytorch_model.safetensors");
    rewrite_safetensors(&file, |name| match name {
        "conv_in.bias" => Edit::Drop,
        _ => Edit::Keep,
    });
    assert_refused(
        &work,
        &model,
        ANIMATEDIFF,
        &["conv_in.bias", "unet/diffusion_pytorch_model.safetensors"],
    );
}

#[test]
fn a_motion_module_without_its_position_table_is_refused() {
    let (work, model) = animatediff("pos-embed");
    let key = "down_blocks.0.motion_modules.0.transformer_blocks.0.pos_embed.pe";
    let file = model.join("unet/diffusion_pytorch_model.safetensors");
    rewrite_safetensors(
        &file,
        |name| {
            if name == key {
                Edit::Drop
            } else {
                Edit::Keep
            }
        },
    );
    assert_refused(
        &work,
        &model,
        ANIMATEDIFF,
        &[key, "unet/diffusion_pytorch_model.safetensors"],
    );
}

#[test]
fn an_empty_merges_file_is_refused() {
    let (work, model) = animatediff("merges");
    std::fs::write(model.join("tokenizer/merges.txt"), "#version: 0.2\n").unwrap();
    assert_refused(
        &work,
        &model,
        ANIMATEDIFF,
        &["tokenizer/merges.txt", "no merges"],
    );
}

#[test]
fn a_clip_token_past_the_embedding_table_is_refused() {
    // A text encoder whose table stops one row short of the vocabulary:
    // `<|endoftext|>` (49407) has no row.
    let (work, model) = animatediff("clip-table");
    let file = model.join("text_encoder/model.safetensors");
    rewrite_safetensors(&file, |name| {
        if name.ends_with("embeddings.token_embedding.weight") {
            Edit::Rows(49407)
        } else {
            Edit::Keep
        }
    });
    edit_json(&model.join("text_encoder/config.json"), |c| {
        c["vocab_size"] = json!(49407)
    });
    assert_refused(
        &work,
        &model,
        ANIMATEDIFF,
        &["tokenizer/vocab.json", "token id 49407", "49407 rows"],
    );
}

#[test]
fn a_umt5_vocabulary_without_unk_is_refused() {
    let (work, model) = wan("unk");
    edit_json(&model.join("tokenizer/tokenizer.json"), |t| {
        for piece in t["model"]["vocab"].as_array_mut().unwrap() {
            if piece[0] == "<unk>" {
                piece[0] = json!("<not-unk>");
            }
        }
        for token in t["added_tokens"].as_array_mut().unwrap() {
            if token["content"] == "<unk>" {
                token["content"] = json!("<not-unk>");
            }
        }
    });
    assert_refused(&work, &model, WAN, &["tokenizer/tokenizer.json", "<unk>"]);
}

#[test]
fn a_umt5_token_past_the_embedding_table_is_refused() {
    // The fixture's vocabulary has 320 pieces; a table of 300 rows cannot
    // embed the last 20.
    let (work, model) = wan("umt5-table");
    rewrite_safetensors(&model.join("text_encoder/model.safetensors"), |name| {
        if name == "shared.weight" || name == "encoder.embed_tokens.weight" {
            Edit::Rows(300)
        } else {
            Edit::Keep
        }
    });
    edit_json(&model.join("text_encoder/config.json"), |c| {
        c["vocab_size"] = json!(300)
    });
    assert_refused(
        &work,
        &model,
        WAN,
        &["tokenizer/tokenizer.json", "token id 319", "300 rows"],
    );
}

#[test]
fn a_wan_vae_without_a_conv_bias_is_refused_naming_the_tensor_and_file() {
    let (work, model) = wan("wan-vae-bias");
    let file = model.join("vae/diffusion_pytorch_model.safetensors");
    rewrite_safetensors(&file, |name| match name {
        "decoder.conv_in.bias" => Edit::Drop,
        _ => Edit::Keep,
    });
    assert_refused(
        &work,
        &model,
        WAN,
        &[
            "decoder.conv_in.bias",
            "vae/diffusion_pytorch_model.safetensors",
        ],
    );
}

/// The test helpers' clean-up (tests/common `remove_ended_runs`): a folder
/// of this test file from a run whose process has ended goes; this run's,
/// another test file's and names that are not the helper's stay.
#[test]
fn temporary_folders_of_ended_runs_are_removed() {
    let parent = common::temp_dir("ended-runs");
    // Above Linux's largest PID (2^22), so never a live process.
    let ended = 4_194_305u32;
    let own = std::process::id();
    let crate_name = env!("CARGO_CRATE_NAME");
    let make = |name: String| {
        std::fs::create_dir_all(parent.join(&name).join("inside")).unwrap();
        name
    };
    let gone = [
        make(format!("motif-{crate_name}-x-{ended}-1")),
        make(format!("motif-{crate_name}-a-b-{ended}-2")),
    ];
    let kept = [
        make(format!("motif-{crate_name}-x-{own}-3")),
        make(format!("motif-other_tests-x-{ended}-4")),
        make(format!("motif-{crate_name}-x-notapid-5")),
    ];
    common::remove_ended_runs(&parent);
    let linux = Path::new("/proc/self").exists();
    for name in &gone {
        assert_eq!(parent.join(name).exists(), !linux, "{name}");
    }
    for name in &kept {
        assert!(parent.join(name).exists(), "{name}");
    }
}
