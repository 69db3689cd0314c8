//! `motif conformance` on the committed reference case sets (written by
//! tools/fixtures/make_cases.py, make_wan_cases.py, make_wan_i2v_cases.py and
//! make_wan_a14b_cases.py and make_wan_ti2v_cases.py from diffusers and
//! transformers), in f32 and f16, and the runner's failure modes.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn conformance(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_motif"))
        .arg("conformance")
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .env_remove("MOTIF_PRECISION")
        .output()
        .expect("motif runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn summary(stdout: &str) -> (usize, usize) {
    let line = stdout.lines().last().unwrap_or_default();
    let nums: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect();
    assert!(
        line.ends_with("failed") && nums.len() == 2,
        "no summary line in:\n{stdout}"
    );
    (nums[0], nums[1])
}

/// Runs the whole set at `dir` in `precision` and asserts that it exits 0
/// with all `outputs` passing; its stdout, for the caller's checks of
/// particular outputs.
fn passes_whole(set: &str, dir: &Path, outputs: usize, precision: &str) -> String {
    let (code, stdout, stderr) = conformance(&[dir.to_str().unwrap(), "--precision", precision]);
    assert_eq!(code, 0, "{set} {precision}:\n{stdout}\n{stderr}");
    assert_eq!(
        summary(&stdout),
        (outputs, 0),
        "{set} {precision}:\n{stdout}"
    );
    stdout
}

/// Outputs a full run compares: every case's `outputs` in the manifest.
fn outputs_in(dir: &Path) -> usize {
    outputs_of(dir, None)
}

/// Outputs of the cases of `components` (all cases with `None`).
fn outputs_of(dir: &Path, components: Option<&[&str]>) -> usize {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    manifest["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| components.is_none_or(|list| list.iter().any(|&n| c["component"] == n)))
        .map(|c| c["outputs"].as_array().map_or(0, Vec::len))
        .sum()
}

#[test]
fn every_component_matches_the_reference_in_f32_and_f16() {
    // cases-a/b: tokenizer, text encoder, UNet, VAE (cases-a also tiled),
    // and the whole pipeline with each of the five schedulers;
    // single-file: an LDM-named checkpoint plus an original-format motion
    // module (tools/fixtures/make_single_file.py).
    for set in ["cases-a", "cases-b", "single-file"] {
        let dir = fixtures().join(set);
        let outputs = outputs_in(&dir);
        assert!(outputs > 5, "{set}: only {outputs} outputs");
        for precision in ["f32", "f16"] {
            let (code, stdout, stderr) =
                conformance(&[dir.to_str().unwrap(), "--precision", precision]);
            assert_eq!(code, 0, "{set} {precision}:\n{stdout}\n{stderr}");
            let (passed, failed) = summary(&stdout);
            assert_eq!(
                (passed, failed),
                (outputs, 0),
                "{set} {precision}:\n{stdout}"
            );
            // One line per output: case, output, error, tolerance, verdict.
            assert_eq!(
                stdout.lines().filter(|l| l.ends_with(" ok")).count(),
                outputs,
                "{stdout}"
            );
        }
    }
}

/// Every component of the Wan format, the whole pipeline included.
const WAN_COMPONENTS: [&str; 6] = [
    "tokenizer",
    "text_encoder",
    "transformer",
    "vae",
    "scheduler",
    "pipeline",
];

#[test]
fn every_wan_component_matches_the_reference_in_f32_and_f16() {
    for set in ["wan-a", "wan-b"] {
        let dir = fixtures().join(set);
        let outputs = outputs_of(&dir, Some(&WAN_COMPONENTS));
        assert!(outputs > 20, "{set}: only {outputs} outputs");
        for precision in ["f32", "f16"] {
            let (code, stdout, stderr) = conformance(&[
                dir.to_str().unwrap(),
                "--precision",
                precision,
                "--component",
                &WAN_COMPONENTS.join(","),
            ]);
            let failing: Vec<&str> = stdout.lines().filter(|l| l.contains("FAIL")).collect();
            assert!(
                failing.is_empty(),
                "{set} {precision}: {failing:#?}\n{stderr}"
            );
            assert_eq!(
                summary(&stdout),
                (outputs, 0),
                "{set} {precision}:\n{stdout}"
            );
            assert_eq!(code, 0, "{set} {precision}: exit {code}");
            assert_eq!(
                stdout.lines().filter(|l| l.ends_with(" ok")).count(),
                outputs,
                "{stdout}"
            );
        }
    }
}

#[test]
fn wan_image_to_video_sets_match_the_reference_in_f32_and_f16() {
    // wan-i2v (Wan2.1-I2V) and wan-flf2v (first-last frame, pos_embed):
    // the CLIP image processor (PIL backend, bit for bit) and vision
    // encoder, the transformer with image tokens and 36 input channels, the
    // VAE encoding of the conditioning video, and the pipeline through its
    // denoising loop (image tokens, the mask + condition channels, every
    // step's latents, the frames).
    for set in ["wan-i2v", "wan-flf2v"] {
        let dir = fixtures().join(set);
        let outputs = outputs_in(&dir);
        assert!(outputs >= 15, "{set}: only {outputs} outputs");
        for precision in ["f32", "f16"] {
            let stdout = passes_whole(set, &dir, outputs, precision);
            for output in [
                "image_processor.pixel_values_1",
                "image_encoder.penultimate_hidden_state",
                "pipeline_unipc.image_embeds",
                "pipeline_unipc.condition",
                "pipeline_unipc.step_latents",
                "pipeline_unipc.frames",
            ] {
                assert!(
                    stdout
                        .lines()
                        .any(|l| l.contains(&format!("{set}_{output}")) && l.ends_with(" ok")),
                    "{set} {precision} {output}:\n{stdout}"
                );
            }
        }
    }
}

#[test]
fn wan_ti2v_set_matches_the_reference_in_f32_and_f16() {
    // wan-ti2v (Wan 2.2 TI2V-5B layout): the 48-channel residual VAE with
    // patch_size 2 (decode across three latent frames, encode of 1 + 2 · 4
    // frames), the transformer with a timestep per token, and the
    // expand_timesteps pipelines: text-to-video and image-to-video (the
    // VAE-encoded still as the first latent frame, its tokens at t = 0).
    let dir = fixtures().join("wan-ti2v");
    let outputs = outputs_in(&dir);
    assert!(outputs >= 17, "wan-ti2v: only {outputs} outputs");
    for precision in ["f32", "f16"] {
        let stdout = passes_whole("wan-ti2v", &dir, outputs, precision);
        for output in [
            "vae_decode.sample",
            "vae_encode.posterior_mean",
            "transformer_b2_token_t.sample",
            "transformer_b1_token_frac_t.sample",
            "pipeline_t2v_unipc.frames",
            "pipeline_i2v_unipc.condition",
            "pipeline_i2v_unipc.step_latents",
            "pipeline_i2v_unipc.frames",
        ] {
            assert!(
                stdout
                    .lines()
                    .any(|l| l.contains(&format!("wan-ti2v_{output}")) && l.ends_with(" ok")),
                "{precision} {output}:\n{stdout}"
            );
        }
    }
}

#[test]
fn wan_pipeline_cases_run_through_the_whole_denoising_loop() {
    // Both samplers, every traced output (timesteps, prompt embeddings,
    // the latents after each step, the final latents, the frames).
    let dir = fixtures().join("wan-b");
    let (code, stdout, stderr) = conformance(&[dir.to_str().unwrap(), "--component", "pipeline"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(summary(&stdout), (10, 0), "{stdout}");
    for sampler in ["unipc", "euler"] {
        for output in ["step_latents", "frames"] {
            assert!(
                stdout
                    .lines()
                    .any(|l| l.contains(&format!("pipeline_{sampler}.{output}"))
                        && l.ends_with(" ok")),
                "{sampler} {output}:\n{stdout}"
            );
        }
    }
}

/// The Wan 2.2 A14B sets (tools/fixtures/make_wan_a14b_cases.py).
const A14B_SETS: [&str; 2] = ["wan-a14b/t2v", "wan-a14b/i2v"];

#[test]
fn wan_a14b_sets_run_both_experts_and_match_the_reference_in_f32_and_f16() {
    // Each expert on the same inputs (input `transformer` names it), and
    // the pipeline through a run whose first step is on `transformer`
    // and the others on `transformer_2`, each under its own guidance
    // scale; the I2V set has no image encoder (the still reaches the
    // model through the conditioning channels alone).
    // wan-a14b/t2v-files: t2v's pipeline case over ComfyUI-style files,
    // the low-noise expert found by name beside the high-noise one.
    for set in [A14B_SETS[0], A14B_SETS[1], "wan-a14b/t2v-files"] {
        let dir = fixtures().join(set);
        let outputs = outputs_in(&dir);
        assert!(outputs >= 5, "{set}: only {outputs} outputs");
        for precision in ["f32", "f16"] {
            let stdout = passes_whole(set, &dir, outputs, precision);
            let mut expected = vec!["pipeline_unipc.step_latents", "pipeline_unipc.frames"];
            match set {
                "wan-a14b/t2v-files" => {}
                _ => expected.extend(["transformer.sample", "transformer_2.sample"]),
            }
            if set.ends_with("i2v") {
                expected.push("pipeline_unipc.condition");
            }
            for output in expected {
                assert!(
                    stdout
                        .lines()
                        .any(|l| l.contains(&format!("_{output}")) && l.ends_with(" ok")),
                    "{set} {precision} {output}:\n{stdout}"
                );
            }
        }
    }
}

/// A copy of `set` in a scratch folder, to be altered.
fn scratch_copy(set: &str, name: &str) -> PathBuf {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let path = entry.unwrap().path();
            let target = to.join(path.file_name().unwrap());
            match path.is_dir() {
                true => copy(&path, &target),
                false => {
                    std::fs::copy(&path, &target).unwrap();
                }
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("motif-a14b-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy(&fixtures().join(set), &dir);
    dir
}

#[test]
fn wan_a14b_references_fail_an_engine_that_ignores_the_second_expert() {
    // The references can tell: an engine that ran the first expert
    // throughout (here: transformer_2's weights replaced by transformer's)
    // or ran the second under the first's guidance (the case's
    // guidance_2 removed) fails the pipeline case.
    for set in A14B_SETS {
        let same = scratch_copy(set, "same-experts");
        for entry in std::fs::read_dir(same.join("transformer")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|x| x == "safetensors") {
                std::fs::copy(
                    &path,
                    same.join("transformer_2").join(path.file_name().unwrap()),
                )
                .unwrap();
            }
        }
        let one_guidance = scratch_copy(set, "one-guidance");
        let manifest_path = one_guidance.join("cases.json");
        let mut manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
        for case in manifest["cases"].as_array_mut().unwrap() {
            if let Some(inputs) = case["inputs"].as_object_mut() {
                inputs.remove("guidance_2");
            }
        }
        std::fs::write(&manifest_path, manifest.to_string()).unwrap();

        for dir in [&same, &one_guidance] {
            let (code, stdout, stderr) =
                conformance(&[dir.to_str().unwrap(), "--component", "pipeline"]);
            assert_ne!(code, 0, "{set} {}:\n{stdout}\n{stderr}", dir.display());
            assert!(
                stdout
                    .lines()
                    .any(|l| l.contains("pipeline_unipc.step_latents") && l.contains("FAIL")),
                "{set} {}:\n{stdout}\n{stderr}",
                dir.display()
            );
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
