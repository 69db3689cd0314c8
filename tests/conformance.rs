//! `motif conformance` on the committed reference case sets (written by
//! tools/fixtures/make_cases.py and make_wan_cases.py from diffusers and
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

/// The Wan components the runner has models for (the `pipeline` cases wait
/// for the Wan family, see `wan_pipeline_cases_fail_by_name`).
const WAN_COMPONENTS: [&str; 5] = [
    "tokenizer",
    "text_encoder",
    "transformer",
    "vae",
    "scheduler",
];

/// Outputs known to exceed CONFORMANCE.md's fixed f16 budget, excluded from
/// the f16 runs by name (the budget itself is never widened): (set, output
/// tensor, why). wan-a's VAE decoder is 4 channels wide at full resolution,
/// so its channel RMS norms normalise 4-vectors, amplifying the f16
/// rounding of the conv output before them: measured 3.07e-2 against a
/// budget of 3.0e-2 (f32: within 1/7 of its tolerance; wan-b's 12-channel
/// decoder within half its f16 budget).
const WAN_F16_OVER_BUDGET: [(&str, &str, &str); 1] = [(
    "wan-a",
    "wan-a_vae_decode.sample",
    "a 4-channel decoder amplifies f16 rounding before its RMS norms: 3.07e-2 > 3.0e-2",
)];

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
            let excused: Vec<&str> = WAN_F16_OVER_BUDGET
                .iter()
                .filter(|(s, _, _)| precision == "f16" && *s == set)
                .map(|(_, output, why)| {
                    eprintln!("{set} {precision}: {output} excluded: {why}");
                    *output
                })
                .collect();
            let failing: Vec<&str> = stdout
                .lines()
                .filter(|l| l.contains("FAIL"))
                .filter(|l| !excused.iter().any(|o| l.contains(&format!("  {o}  "))))
                .collect();
            assert!(
                failing.is_empty(),
                "{set} {precision}: {failing:#?}\n{stderr}"
            );
            let (passed, failed) = summary(&stdout);
            assert_eq!(failed, excused.len(), "{set} {precision}:\n{stdout}");
            assert_eq!(passed + failed, outputs, "{set} {precision}:\n{stdout}");
            assert_eq!(
                code == 0,
                excused.is_empty(),
                "{set} {precision}: exit {code}"
            );
            assert_eq!(
                stdout.lines().filter(|l| l.ends_with(" ok")).count(),
                outputs - excused.len(),
                "{stdout}"
            );
        }
    }
}

#[test]
fn wan_pipeline_cases_fail_by_name() {
    // Until the Wan family is wired into the runner, a Wan pipeline case
    // cannot run, and a case that cannot run is a failure.
    let dir = fixtures().join("wan-b");
    let (code, stdout, _) = conformance(&[dir.to_str().unwrap(), "--component", "pipeline"]);
    assert_ne!(code, 0);
    assert_eq!(summary(&stdout), (0, 2), "{stdout}");
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.contains("FAIL: ") && l.contains("needs the Wan family"))
            .count(),
        2,
        "{stdout}"
    );
}

#[test]
fn the_pipeline_component_runs_alone_and_covers_every_scheduler() {
    let dir = fixtures().join("cases-b");
    let (code, stdout, stderr) = conformance(&[dir.to_str().unwrap(), "--component", "pipeline"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    for scheduler in ["ddim", "euler", "euler_a", "dpmpp2m_karras", "lcm"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(&format!("pipeline_{scheduler}.frames")) && l.ends_with(" ok")),
            "{scheduler}: {stdout}"
        );
    }
    assert!(!stdout.contains("_unet"), "{stdout}");
}

#[test]
fn a_wrong_expected_value_fails_the_run() {
    // Copy a case set and perturb one expected value by 1e-3 (50x its tolerance).
    let src = fixtures().join("cases-a");
    let dst = std::env::temp_dir().join(format!("motif-conf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    copy_dir(&src, &dst);
    let path = dst.join("cases.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let begin = header["cases-a_text_encoder.pooler_output"]["data_offsets"][0]
        .as_u64()
        .unwrap() as usize
        + 8
        + header_len;
    let v = f32::from_le_bytes(bytes[begin..begin + 4].try_into().unwrap()) + 1e-3;
    bytes[begin..begin + 4].copy_from_slice(&v.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let (code, stdout, _) = conformance(&[
        dst.to_str().unwrap(),
        "--precision",
        "f32",
        "--component",
        "text_encoder",
    ]);
    assert_ne!(code, 0);
    assert_eq!(summary(&stdout), (2, 1), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("pooler_output") && l.ends_with("FAIL")),
        "{stdout}"
    );
}

#[test]
fn unknown_or_unimplemented_components_fail() {
    let dir = fixtures().join("cases-a");
    let (code, _, stderr) = conformance(&[dir.to_str().unwrap(), "--component", "nonsense"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("unknown component `nonsense`"), "{stderr}");
    // Selecting a component with no cases runs nothing: that is not a pass.
    let (code, stdout, _) = conformance(&[dir.to_str().unwrap(), "--component", "scheduler"]);
    assert_ne!(code, 0);
    assert_eq!(summary(&stdout), (0, 0));
    let (code, _, stderr) = conformance(&[fixtures().join("nowhere").to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(stderr.contains("cases.json"), "{stderr}");
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        // Follows links: the case sets link tokenizer/ to assets/.
        if std::fs::metadata(entry.path()).unwrap().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), to).unwrap();
        }
    }
}
