//! `motif generate` on a Wan 2.1 diffusers folder (the reference set
//! tests/fixtures/wan-a, random weights at tiny widths, loaded as a user's
//! download is): an MP4 any player opens, the recipe with the sampler and
//! the shift, `--from` replaying the same frames; and the settings Wan
//! cannot take, refused before any file appears with what to pass instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn wan() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/wan-a")
        .to_string_lossy()
        .into_owned()
}

mod common;

fn scratch(name: &str) -> PathBuf {
    common::temp_dir(name)
}

/// `motif ARGS` in `dir`, with no model or precision from the caller's
/// environment.
fn motif(dir: &Path, args: &[&str]) -> Output {
    common::motif_command(args, &[])
        .current_dir(dir)
        .env_remove("MOTIF_MODEL")
        .env_remove("MOTIF_PRECISION")
        .output()
        .expect("motif runs")
}

/// 48x32, 5 frames (two latent frames), 2 steps.
fn tiny<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    sized(model, ("48", "32", "5"), extra)
}

fn sized<'a>(
    model: &'a str,
    (w, h, f): (&'a str, &'a str, &'a str),
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut a = vec![
        "generate",
        "a red ball bouncing on grass",
        "--model",
        model,
        "--width",
        w,
        "--height",
        h,
        "--frames",
        f,
        "--steps",
        "2",
        "--seed",
        "7",
    ];
    a.extend_from_slice(extra);
    a
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_wan_folder_generates_an_mp4_with_its_recipe_and_replays_it() {
    let dir = scratch("mp4");
    let model = wan();
    let o = motif(
        &dir,
        &tiny(
            &model,
            &["--shift", "5", "--scheduler", "unipc", "-o", "a.mp4"],
        ),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-show_entries"])
        .args([
            "stream=codec_name,width,height,nb_read_frames",
            "-of",
            "csv=p=0",
        ])
        .arg(dir.join("a.mp4"))
        .output()
        .expect("ffprobe runs (apt-get install ffmpeg)");
    assert_eq!(
        String::from_utf8_lossy(&probe.stdout).trim(),
        "h264,48,32,5"
    );
    let recipe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("a.json")).unwrap()).unwrap();
    assert_eq!(recipe["scheduler"], "unipc");
    assert_eq!(recipe["shift"], 5.0);
    assert_eq!(recipe["fps"], 16.0, "Wan's own frame rate");
    // The same recipe gives the same frames (PNG frames compare exactly).
    let o = motif(&dir, &["generate", "--from", "a.json", "-o", "b"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = motif(
        &dir,
        &tiny(&model, &["--shift", "5", "--scheduler", "unipc", "-o", "c"]),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let frames = |d: &str| png_frames(&dir.join(d));
    assert_eq!(frames("b").len(), 5);
    assert_eq!(frames("b"), frames("c"));
    // Another shift is another clip.
    let o = motif(
        &dir,
        &tiny(&model, &["--shift", "2", "--scheduler", "unipc", "-o", "d"]),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(frames("b"), frames("d"));
}

#[test]
fn settings_wan_cannot_take_are_refused_with_what_to_pass() {
    let dir = scratch("refused");
    let model = wan();
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/models/default")
        .to_string_lossy()
        .into_owned();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (sized(&model, ("48", "32", "6"), &[]), "pass 5 or 9"),
        (sized(&model, ("40", "32", "5"), &[]), "pass 32 or 48"),
        (
            tiny(&model, &["--camera", "zoom-in"]),
            "`camera` is not supported",
        ),
        (
            tiny(&model, &["--motion", "3"]),
            "`motion` is not supported",
        ),
        (tiny(&model, &["--scheduler", "ddim"]), "scheduler ddim"),
        (
            sized(&bundled, ("32", "32", "4"), &["--shift", "3"]),
            "`shift` is not supported",
        ),
    ];
    for (args, expected) in cases {
        let mut args = args;
        args.extend_from_slice(&["-o", "x.mp4"]);
        let o = motif(&dir, &args);
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(stderr(&o).contains(expected), "{args:?}: {}", stderr(&o));
        assert!(!dir.join("x.mp4").exists(), "{args:?} left a file");
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
}

#[test]
fn a_wan_lora_changes_the_clip_at_its_weight_and_misfits_are_refused() {
    let dir = scratch("lora");
    let model = wan();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let lora = |name: &str, weight: &str| {
        format!(
            "{}:{weight}",
            fixtures.join("wan-lora").join(name).display()
        )
    };
    let (with, zero) = (
        lora("comfy.safetensors", "0.7"),
        lora("comfy.safetensors", "0"),
    );
    for (out, extra) in [
        ("plain", vec![]),
        ("with", vec!["--lora", with.as_str()]),
        ("zero", vec!["--lora", zero.as_str()]),
    ] {
        let mut args = tiny(&model, &extra);
        args.extend_from_slice(&["-o", out]);
        let o = motif(&dir, &args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
    // The frames' pixels (each PNG also carries its recipe, which names the LoRA).
    let pixels = |d: &str| {
        common::pngs(&dir.join(d))
            .iter()
            .map(|p| image::open(p).unwrap().to_rgb8().into_raw())
            .collect::<Vec<_>>()
    };
    assert_eq!(pixels("plain").len(), 5);
    assert_ne!(pixels("plain"), pixels("with"), "the LoRA changed nothing");
    assert_eq!(pixels("plain"), pixels("zero"), "weight 0 is no LoRA");

    // An AnimateDiff LoRA on Wan: refused before any file appears.
    let sd = format!("{}:0.5", fixtures.join("lora/kohya.safetensors").display());
    let mut args = tiny(&model, &["--lora", sd.as_str()]);
    args.extend_from_slice(&["-o", "x.mp4"]);
    let o = motif(&dir, &args);
    assert!(!o.status.success(), "an SD LoRA was accepted");
    let e = stderr(&o);
    assert!(
        e.contains("kohya.safetensors") && e.contains("this LoRA is for Stable Diffusion"),
        "{e}"
    );
    assert!(
        !dir.join("x.mp4").exists() && !e.contains("panicked"),
        "{e}"
    );
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// A still with a gradient per channel (`tint` changes it).
fn write_png(path: &Path, (w, h): (u32, u32), tint: u8) {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 7) as u8, tint])
    })
    .save(path)
    .unwrap();
}

/// All PNG frames of an output folder, in order.
fn png_frames(dir: &Path) -> Vec<Vec<u8>> {
    common::pngs(dir)
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

#[test]
fn wan_image_to_video_folders_animate_a_still_and_end_on_a_last_one() {
    // wan-i2v (Wan2.1-I2V layout) and wan-flf2v (first-last frame): the
    // reference sets' folders, loaded as a user's download is.
    let dir = scratch("i2v");
    write_png(&dir.join("first.png"), (48, 32), 40);
    write_png(&dir.join("other.png"), (48, 32), 220);
    write_png(&dir.join("last.png"), (60, 40), 200);
    let (i2v, flf) = (fixture("wan-i2v"), fixture("wan-flf2v"));

    let o = motif(&dir, &tiny(&i2v, &["--image", "first.png", "-o", "a"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(png_frames(&dir.join("a")).len(), 5);
    let recipe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("a/recipe.json")).unwrap()).unwrap();
    assert_eq!(recipe["image"], "first.png");
    // The still conditions the clip: another still, another clip.
    let o = motif(&dir, &tiny(&i2v, &["--image", "other.png", "-o", "b"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(png_frames(&dir.join("a")), png_frames(&dir.join("b")));

    // First-last frame, a last image of another size (resized as diffusers does).
    let args = sized(
        &flf,
        ("32", "48", "9"),
        &[
            "--image",
            "first.png",
            "--last-image",
            "last.png",
            "-o",
            "c.mp4",
        ],
    );
    let o = motif(&dir, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let recipe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("c.json")).unwrap()).unwrap();
    assert_eq!(recipe["last_image"], "last.png");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_stills_and_image_to_video_folders_are_refused_before_any_output() {
    let dir = scratch("i2v-refused");
    write_png(&dir.join("first.png"), (48, 32), 40);
    write_png(&dir.join("tiny.png"), (12, 20), 40);
    std::fs::write(dir.join("broken.png"), b"not a png at all").unwrap();
    let (i2v, flf, t2v) = (fixture("wan-i2v"), fixture("wan-flf2v"), wan());
    // An image-to-video folder whose model_index.json names no image encoder.
    let no_encoder = dir.join("no-encoder");
    std::fs::create_dir_all(&no_encoder).unwrap();
    for entry in std::fs::read_dir(&i2v).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_owned();
        if path.is_dir() && name != "image_encoder" && name != "image_processor" {
            let to = no_encoder.join(&name);
            std::fs::create_dir_all(&to).unwrap();
            for f in std::fs::read_dir(&path).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
            }
        }
    }
    let mut index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&i2v).join("model_index.json")).unwrap(),
    )
    .unwrap();
    index["image_encoder"] = serde_json::json!([null, null]);
    index["image_processor"] = serde_json::json!([null, null]);
    std::fs::write(no_encoder.join("model_index.json"), index.to_string()).unwrap();
    let no_encoder = no_encoder.to_string_lossy().into_owned();

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            tiny(&i2v, &["--image", "broken.png"]),
            "broken.png: cannot read the image",
        ),
        (
            tiny(&i2v, &["--image", "tiny.png"]),
            "12x20 pixels; at least 16x16",
        ),
        (
            tiny(&flf, &["--last-image", "first.png"]),
            "needs a first image too",
        ),
        (
            tiny(
                &flf,
                &["--image", "first.png", "--last-image", "broken.png"],
            ),
            "broken.png",
        ),
        (tiny(&i2v, &[]), "image-to-video model: give it the still"),
        (
            tiny(&flf, &["--image", "first.png"]),
            "first-last-frame model: give it the last frame too",
        ),
        (
            tiny(&i2v, &["--image", "first.png", "--last-image", "first.png"]),
            "`last_image` is not supported",
        ),
        (
            tiny(&t2v, &["--image", "first.png"]),
            "`image` is not supported",
        ),
        (
            tiny(&i2v, &["--image", "first.png", "--strength", "0.5"]),
            "`strength` is not supported",
        ),
        (
            tiny(&no_encoder, &["--image", "first.png"]),
            "names no image encoder",
        ),
    ];
    for (args, expected) in cases {
        let mut args = args;
        args.extend_from_slice(&["-o", "x.mp4"]);
        let o = motif(&dir, &args);
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(stderr(&o).contains(expected), "{args:?}: {}", stderr(&o));
        assert!(!dir.join("x.mp4").exists(), "{args:?} left a file");
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A copy of the fixture `set` in `dir/name`, model_index.json edited by
/// `edit` (the reference sets stay untouched).
fn edited_copy(
    set: &str,
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> String {
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
    let to = dir.join(name);
    copy(Path::new(&fixture(set)), &to);
    let index_path = to.join("model_index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    edit(&mut index);
    std::fs::write(&index_path, index.to_string()).unwrap();
    to.to_string_lossy().into_owned()
}

#[test]
fn wan_a14b_folders_switch_experts_with_their_own_guidance() {
    // wan-a14b/t2v and i2v: Wan 2.2 A14B layouts (transformer_2,
    // boundary_ratio 0.875 and 0.9). Two steps at shift 3 are t = 999
    // (`transformer`) and 750 (`transformer_2`): both experts run.
    let dir = scratch("a14b");
    write_png(&dir.join("first.png"), (48, 32), 40);
    let (t2v, i2v) = (fixture("wan-a14b/t2v"), fixture("wan-a14b/i2v"));
    let recipe = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
    };

    let o = motif(
        &dir,
        &tiny(&t2v, &["--guidance", "4", "--guidance-2", "2", "-o", "a"]),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // The first expert leaves the device before the second loads.
    assert!(
        stderr(&o).contains("step 2: transformer freed, loading transformer_2"),
        "{}",
        stderr(&o)
    );
    assert_eq!(png_frames(&dir.join("a")).len(), 5);
    assert_eq!(recipe("a/recipe.json")["guidance_2"], 2.0);
    // Without --guidance-2 the second expert takes --guidance (as
    // diffusers), and the recipe says so.
    let o = motif(&dir, &tiny(&t2v, &["--guidance", "4", "-o", "b"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(recipe("b/recipe.json")["guidance_2"], 4.0);
    assert_ne!(png_frames(&dir.join("a")), png_frames(&dir.join("b")));
    // The recipe replays with the second guidance.
    let o = motif(&dir, &["generate", "--from", "a/recipe.json", "-o", "c"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(png_frames(&dir.join("a")), png_frames(&dir.join("c")));

    // A14B I2V: no image encoder, the still through the VAE alone.
    let o = motif(
        &dir,
        &tiny(
            &i2v,
            &["--image", "first.png", "--guidance-2", "1.5", "-o", "d.mp4"],
        ),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(recipe("d.json")["guidance_2"], 1.5);
    assert_eq!(recipe("d.json")["image"], "first.png");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn broken_a14b_folders_and_second_guidance_elsewhere_are_refused() {
    let dir = scratch("a14b-refused");
    write_png(&dir.join("first.png"), (48, 32), 40);
    let no_second = edited_copy("wan-a14b/t2v", &dir, "no-second", |i| {
        i["transformer_2"] = serde_json::json!([null, null]);
    });
    let no_boundary = edited_copy("wan-a14b/t2v", &dir, "no-boundary", |i| {
        i.as_object_mut().unwrap().remove("boundary_ratio");
    });
    let boundary_one = edited_copy("wan-a14b/t2v", &dir, "boundary-one", |i| {
        i["boundary_ratio"] = serde_json::json!(1.0);
    });
    let missing_folder = edited_copy("wan-a14b/t2v", &dir, "missing-folder", |_| {});
    std::fs::remove_dir_all(Path::new(&missing_folder).join("transformer_2")).unwrap();
    let mismatched = edited_copy("wan-a14b/t2v", &dir, "mismatched", |_| {});
    let config = Path::new(&mismatched).join("transformer_2/config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["num_layers"] = serde_json::json!(3);
    std::fs::write(&config, c.to_string()).unwrap();
    let (t2v, i2v, wan21) = (fixture("wan-a14b/t2v"), fixture("wan-a14b/i2v"), wan());

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (tiny(&no_second, &[]), "names no `transformer_2`"),
        (tiny(&no_boundary, &[]), "but no `boundary_ratio`"),
        (
            tiny(&boundary_one, &[]),
            "boundary_ratio 1 must lie strictly between 0 and 1",
        ),
        (
            tiny(&missing_folder, &[]),
            "needs `transformer_2/` (the low-noise expert)",
        ),
        (
            tiny(&mismatched, &[]),
            "the experts differ in shape: `transformer` has num_layers 2, `transformer_2` 3",
        ),
        (
            tiny(&wan21, &["--guidance-2", "3"]),
            "`guidance_2` is not supported",
        ),
        (tiny(&i2v, &[]), "image-to-video model: give it the still"),
        (
            tiny(&t2v, &["--image", "first.png"]),
            "`image` is not supported",
        ),
    ];
    for (args, expected) in cases {
        let mut args = args;
        args.extend_from_slice(&["-o", "x.mp4"]);
        let o = motif(&dir, &args);
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(stderr(&o).contains(expected), "{args:?}: {}", stderr(&o));
        assert!(!dir.join("x.mp4").exists(), "{args:?} left a file");
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a14b_single_files_without_their_pair_are_refused_before_any_gpu_work() {
    // wan-a14b/t2v-files holds ComfyUI-named experts
    // (wan2.2_t2v_{high,low}_noise_tiny_f32.safetensors): the pairing by
    // name, and its failures, come before the GPU opens (an adapter that
    // does not exist would otherwise be the error).
    let dir = scratch("a14b-files");
    let files = Path::new(&fixture("wan-a14b/t2v-files")).to_path_buf();
    let file = |name: &str| files.join(name).to_string_lossy().into_owned();
    let alone = dir.join("alone");
    std::fs::create_dir_all(&alone).unwrap();
    let high = "wan2.2_t2v_high_noise_tiny_f32.safetensors";
    std::fs::copy(files.join(high), alone.join(high)).unwrap();
    let alone_high = alone.join(high).to_string_lossy().into_owned();
    let (te, vae) = (file("umt5.safetensors"), file("vae.safetensors"));
    let low = file("wan2.2_t2v_low_noise_tiny_f32.safetensors");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--model", &alone_high],
            vec![
                "high-noise expert of a Wan 2.2 A14B pair",
                "wan2.2_t2v_low_noise_tiny_f32.safetensors is not beside it",
                "--transformer-2 FILE",
            ],
        ),
        (
            vec!["--model", &low],
            vec!["this is the low-noise expert", "pass the high-noise file"],
        ),
        (
            vec![
                "--model",
                &alone_high,
                "--transformer-2",
                "nowhere.safetensors",
            ],
            vec!["--transformer-2 nowhere.safetensors: no such file"],
        ),
        (
            vec!["--model", &alone_high, "--transformer-2", &vae],
            vec!["given as --transformer-2", "a Wan transformer"],
        ),
    ];
    for (model, expected) in cases {
        let mut args = vec![
            "--adapter",
            "no-such-gpu",
            "generate",
            "a red ball",
            "--text-encoder",
            &te,
            "--vae",
            &vae,
            "-o",
            "x.mp4",
        ];
        args.extend_from_slice(&model);
        let o = motif(&dir, &args);
        common::assert_refused_before_gpu(&o, &format!("{model:?}"), &expected, &dir.join("x.mp4"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_wan_ti2v_folder_makes_text_to_video_and_animates_a_still() {
    // wan-ti2v (Wan 2.2 TI2V-5B layout: expand_timesteps, the 48-channel
    // VAE), loaded as a user's download is: one model for both.
    let dir = scratch("ti2v");
    write_png(&dir.join("first.png"), (64, 32), 40);
    write_png(&dir.join("other.png"), (50, 70), 220);
    let ti2v = fixture("wan-ti2v");
    let clip = ("64", "32", "5");

    let o = motif(&dir, &sized(&ti2v, clip, &["-o", "t2v"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(png_frames(&dir.join("t2v")).len(), 5);
    let o = motif(
        &dir,
        &sized(&ti2v, clip, &["--image", "first.png", "-o", "a"]),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(png_frames(&dir.join("a")).len(), 5);
    let recipe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("a/recipe.json")).unwrap()).unwrap();
    assert_eq!(recipe["image"], "first.png");
    // TI2V-5B's own frame rate, not Wan 2.1's 16.
    assert_eq!(recipe["fps"], 24.0);
    // The still conditions the clip (another one, of another size, is
    // resized to the clip): not the text-to-video clip, not the first still's.
    let o = motif(
        &dir,
        &sized(&ti2v, clip, &["--image", "other.png", "-o", "b"]),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(png_frames(&dir.join("a")), png_frames(&dir.join("t2v")));
    assert_ne!(png_frames(&dir.join("a")), png_frames(&dir.join("b")));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_wan_ti2v_folder_refuses_sizes_off_32_and_a_last_image() {
    let dir = scratch("ti2v-refused");
    write_png(&dir.join("first.png"), (64, 32), 40);
    let ti2v = fixture("wan-ti2v");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        // Multiples of 16 that Wan 2.1 takes: the 2.2 VAE's 16 × the 2x2 patch.
        (
            sized(&ti2v, ("48", "32", "5"), &[]),
            "--width 48: not a multiple of 32 (what the model's latents need); pass 32 or 64",
        ),
        (
            sized(&ti2v, ("64", "80", "5"), &["--image", "first.png"]),
            "--height 80: not a multiple of 32 (what the model's latents need); pass 64 or 96",
        ),
        (
            sized(
                &ti2v,
                ("64", "32", "5"),
                &["--image", "first.png", "--last-image", "first.png"],
            ),
            "`last_image` is not supported by the model",
        ),
    ];
    for (args, expected) in cases {
        let mut args = args;
        args.extend_from_slice(&["-o", "x.mp4"]);
        let o = motif(&dir, &args);
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(stderr(&o).contains(expected), "{args:?}: {}", stderr(&o));
        assert!(!dir.join("x.mp4").exists(), "{args:?} left a file");
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
