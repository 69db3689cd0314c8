//! The `motif` binary end to end: `info`, `bench`, and the errors a user sees
//! for bad flags or a machine without any Vulkan driver.

use std::process::Command;

fn motif() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_motif"));
    c.env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .env_remove("MOTIF_ADAPTER")
        .env_remove("MOTIF_PRECISION");
    c
}

fn run(c: &mut Command) -> (bool, String, String) {
    let out = c.output().expect("motif runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn info_lists_the_chosen_adapter_with_features_and_limits() {
    let (ok, stdout, stderr) = run(motif().arg("info"));
    assert!(ok, "{stderr}");
    for needle in [
        "adapters:",
        "chosen: [",
        "precision:",
        "SHADER_F16:",
        "SUBGROUP:",
        "TIMESTAMP_QUERY:",
        "largest storage binding:",
    ] {
        assert!(stdout.contains(needle), "missing `{needle}` in:\n{stdout}");
    }
}

#[test]
fn info_honours_a_forced_adapter_and_precision() {
    let (ok, stdout, stderr) = run(motif().args(["info", "--adapter", "0", "--precision", "f32"]));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("chosen: [0]") && stdout.contains("precision: f32 (requested)"),
        "{stdout}"
    );
}

#[test]
fn unknown_adapter_is_an_error_listing_the_available_ones() {
    let (ok, _, stderr) = run(motif().args(["info", "--adapter", "no-such-gpu"]));
    assert!(!ok);
    assert!(
        stderr.contains("adapter `no-such-gpu` not found") && stderr.contains("[0]"),
        "{stderr}"
    );
    let (ok, _, stderr) = run(motif()
        .args(["info", "--adapter", "99"])
        .env("MOTIF_ADAPTER", ""));
    assert!(!ok);
    assert!(stderr.contains("adapter `99` not found"), "{stderr}");
}

#[test]
fn bad_precision_names_the_flag_and_the_choices() {
    let (ok, _, stderr) = run(motif().args(["info", "--precision", "f8"]));
    assert!(!ok);
    assert!(
        stderr.contains("--precision") && stderr.contains("f16 or f32"),
        "{stderr}"
    );
}

#[test]
fn no_vulkan_driver_gives_instructions_for_the_software_driver() {
    // Point the Vulkan loader at no driver at all.
    let (ok, _, stderr) = run(motif()
        .arg("info")
        .env("VK_ICD_FILENAMES", "/nonexistent.json")
        .env("VK_DRIVER_FILES", "/nonexistent.json"));
    assert!(!ok);
    assert!(
        stderr.contains("no GPU adapter found") && stderr.contains("mesa-vulkan-drivers"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bench_ops_prints_a_rate_for_every_case() {
    // Few iterations: this checks that the benchmark runs, not how fast.
    let (ok, stdout, stderr) = run(motif().args(["bench", "--ops", "--iters", "1"]));
    assert!(ok, "{stderr}");
    for case in [
        "matmul 1024x1024x1024",
        "conv2d 3x3",
        "attention 4096",
        "group_norm",
        "add [",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(case))
            .unwrap_or_else(|| panic!("no `{case}` line in:\n{stdout}"));
        assert!(line.contains("GFLOP/s") || line.contains("GB/s"), "{line}");
    }
    assert!(stdout.contains("peak GPU memory"), "{stdout}");
}

#[test]
fn the_full_size_unet_step_plans_in_f32_and_f16() {
    // A dry run through the allocator: every operator of the real-size
    // 512x512x16 step must accept its shapes (f32 weights exceed the packed
    // conv kernel's limit and must take the splitting kernel).
    for precision in ["f32", "f16"] {
        let (ok, stdout, stderr) =
            run(motif().args(["bench", "--unet", "--plan", "--precision", precision]));
        assert!(ok, "{precision}: {stderr}");
        assert!(
            stdout.contains("512x512, 16 frames, batch 2") && stdout.contains("peak GPU memory"),
            "{stdout}"
        );
    }
}
