//! `motif view` in its scripted mode, under Xvfb, on whatever adapter the
//! engine picks (the software driver in CI): the window shows the clip it
//! saved, the preview is live, Cancel leaves nothing, and a remix restores
//! every setting. Generations are tiny: 64x64, 4 frames, 2 steps.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn model() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/models/default")
        .to_string_lossy()
        .into_owned()
}

/// The tiny random-weight Wan 2.1 folder (tests/wan.rs).
fn wan() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/wan-a")
        .to_string_lossy()
        .into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("motif-view-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A private X server for one test; killed on drop.
struct Xvfb {
    child: Child,
    display: String,
}

impl Xvfb {
    fn start(n: u32) -> Xvfb {
        // Display numbers from the process id, so parallel test runs do not meet.
        let number = 100 + (std::process::id() % 500) * 8 + n;
        let mut child = Command::new("Xvfb")
            .args([
                &format!(":{number}"),
                "-screen",
                "0",
                "1280x800x24",
                "-nolisten",
                "tcp",
                // By default the server resets when its last client leaves,
                // and a client that connects during the reset is refused:
                // a test runs `motif view` several times in a row.
                "-noreset",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("Xvfb runs (apt-get install xvfb; CI does)");
        let socket = PathBuf::from(format!("/tmp/.X11-unix/X{number}"));
        let start = Instant::now();
        // Several test threads start a server and a software-rendered
        // window each at once on two cores: the socket can take a while.
        while !socket.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("Xvfb :{number} exited ({status}) before its socket appeared");
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "Xvfb :{number} did not start in 90 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Xvfb {
            child,
            display: format!(":{number}"),
        }
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        // SIGTERM first, so that the server removes its lock file and
        // socket (SIGKILL leaves them behind in /tmp).
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A headless Wayland compositor (Weston) for one test; killed on drop.
/// None, after a loud message, where weston is not installed.
struct Weston {
    child: Child,
    socket: String,
}

impl Weston {
    fn start(n: u32) -> Option<Weston> {
        let socket = format!("wayland-motif-{}-{n}", std::process::id());
        let child = match Command::new("weston")
            .args([
                "--backend=headless-backend.so",
                // Its default renderer draws nothing and so never sends frame
                // callbacks, on which a Vulkan FIFO present waits forever.
                "--use-pixman",
                &format!("--socket={socket}"),
                "--width=1280",
                "--height=800",
                "--idle-time=0",
            ])
            .env("XDG_RUNTIME_DIR", std::env::temp_dir())
            .env_remove("DISPLAY")
            .env_remove("WAYLAND_DISPLAY")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!(
                    "\n!!! SKIPPED: the Wayland test needs weston ({e}); apt-get install weston \
                     (CI does) !!!\n"
                );
                return None;
            }
        };
        let path = std::env::temp_dir().join(&socket);
        let start = Instant::now();
        let mut weston = Weston { child, socket };
        while !path.exists() {
            if let Ok(Some(status)) = weston.child.try_wait() {
                panic!(
                    "weston exited with {status} before opening {}",
                    path.display()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "weston did not open {}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Let the shell finish starting before a client maps a window.
        std::thread::sleep(Duration::from_millis(300));
        Some(weston)
    }
}

impl Drop for Weston {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the window opens: an X server or a Wayland compositor.
enum Display<'a> {
    X(&'a Xvfb),
    Wayland(&'a Weston),
}

fn view(x: &Xvfb, dir: &Path, args: &[&str]) -> Output {
    view_on(Display::X(x), dir, args)
}

fn view_on(display: Display, dir: &Path, args: &[&str]) -> Output {
    // A window that never gets to draw (a compositor that sends no frame
    // callbacks) would wait forever: coreutils' timeout ends it.
    let mut cmd = Command::new("timeout");
    cmd.args(["300", env!("CARGO_BIN_EXE_motif")]);
    match display {
        Display::X(x) => cmd.env("DISPLAY", &x.display).env_remove("WAYLAND_DISPLAY"),
        Display::Wayland(w) => cmd.env("WAYLAND_DISPLAY", &w.socket).env_remove("DISPLAY"),
    };
    let out = cmd
        .current_dir(dir)
        .arg("view")
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .env("WGPU_BACKEND", "vulkan")
        .env_remove("MOTIF_MODEL")
        .env_remove("MOTIF_PRECISION")
        .output()
        .expect("motif runs");
    eprintln!(
        "motif view {args:?}: {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// 64x64, 4 frames, 2 steps, a fixed seed, clips into `outputs`.
fn tiny<'a>(model: &'a str, outputs: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "--prompt",
        "a red ball bouncing on green grass",
        "--model",
        model,
        "--width",
        "64",
        "--height",
        "64",
        "--frames",
        "4",
        "--steps",
        "2",
        "--seed",
        "7",
        "--outputs",
        outputs,
        "--auto-generate",
    ];
    a.extend_from_slice(extra);
    a
}

fn line(out: &Output, key: &str) -> Option<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
}

fn clip_rect(out: &Output) -> (u32, u32, u32, u32) {
    let v: Vec<u32> = line(out, "clip_rect:")
        .expect("the clip's rectangle is printed")
        .split_whitespace()
        .map(|n| n.parse::<f32>().unwrap() as u32)
        .collect();
    (v[0], v[1], v[2], v[3])
}

fn crop(png: &Path, (x, y, w, h): (u32, u32, u32, u32)) -> image::RgbImage {
    let img = image::open(png).unwrap().to_rgb8();
    assert!(x + w <= img.width() && y + h <= img.height());
    image::imageops::crop_imm(&img, x, y, w, h).to_image()
}

/// The last frame of an MP4, decoded by ffmpeg.
fn last_frame(mp4: &Path, w: u32, h: u32) -> image::RgbImage {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(mp4)
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .expect("ffmpeg runs (install ffmpeg; CI does)");
    assert!(out.status.success());
    let n = (w * h * 3) as usize;
    assert!(out.stdout.len() >= n && out.stdout.len().is_multiple_of(n));
    image::RgbImage::from_raw(w, h, out.stdout[out.stdout.len() - n..].to_vec()).unwrap()
}

/// Normalised cross-correlation of two same-size images (all channels).
fn ncc(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    let (a, b): (Vec<f64>, Vec<f64>) = (
        a.as_raw().iter().map(|&v| v as f64).collect(),
        b.as_raw().iter().map(|&v| v as f64).collect(),
    );
    assert_eq!(a.len(), b.len());
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (ma, mb) = (mean(&a), mean(&b));
    let (mut num, mut da, mut db) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(&b) {
        num += (x - ma) * (y - mb);
        da += (x - ma) * (x - ma);
        db += (y - mb) * (y - mb);
    }
    num / (da.sqrt() * db.sqrt()).max(1e-9)
}

fn clips_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|e| {
            e.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "mp4"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_window_shows_the_saved_clip_and_the_preview_is_live() {
    let x = Xvfb::start(0);
    let dir = scratch("final");
    let (m, outputs) = (model(), dir.join("out").to_string_lossy().into_owned());

    // At the end of the run: the saved clip's last frame fills the clip rectangle.
    let out = view(
        &x,
        &dir,
        &tiny(&m, &outputs, &["--screenshot", "final.png"]),
    );
    assert!(out.status.success());
    let clip = PathBuf::from(line(&out, "clip:").expect("the clip's path is printed"));
    assert!(clip.is_file() && clip.starts_with(&outputs));
    let rect = clip_rect(&out);
    assert!(rect.2 >= 64 && rect.3 >= 64, "clip drawn at {rect:?}");
    let shown = crop(&dir.join("final.png"), rect);
    let frame = image::imageops::resize(
        &last_frame(&clip, 64, 64),
        rect.2,
        rect.3,
        image::imageops::FilterType::Triangle,
    );
    let score = ncc(&shown, &frame);
    assert!(
        score >= 0.9,
        "NCC {score:.3} between the window and the clip"
    );

    // After step 1 of 2: the same rectangle shows the forming clip, not the final one.
    let out = view(
        &x,
        &dir,
        &tiny(
            &m,
            &outputs,
            &["--screenshot", "early.png", "--screenshot-at-step", "1"],
        ),
    );
    assert!(out.status.success());
    assert_eq!(clip_rect(&out), rect);
    let early = crop(&dir.join("early.png"), rect);
    let diff: f64 = early
        .as_raw()
        .iter()
        .zip(shown.as_raw())
        .map(|(&a, &b)| (a as f64 - b as f64).abs())
        .sum::<f64>()
        / early.as_raw().len() as f64;
    assert!(
        diff > 4.0,
        "the step-1 preview equals the final frame (mean difference {diff:.2})"
    );
    // The screenshot run stopped there: still only the first clip.
    assert_eq!(clips_in(Path::new(&outputs)).len(), 1);
}

#[test]
fn cancel_stops_the_run_and_saves_nothing() {
    let x = Xvfb::start(1);
    let dir = scratch("cancel");
    let (m, outputs) = (model(), dir.join("out").to_string_lossy().into_owned());
    let out = view(
        &x,
        &dir,
        &tiny(
            &m,
            &outputs,
            &["--cancel-at-step", "1", "--screenshot", "c.png"],
        ),
    );
    assert!(out.status.success());
    assert_eq!(line(&out, "cancelled after step").as_deref(), Some("1"));
    assert!(dir.join("c.png").is_file());
    assert!(clips_in(Path::new(&outputs)).is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(&outputs)
        .map(|e| e.filter_map(|e| e.ok()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "left {leftovers:?}");
}

#[test]
fn remix_restores_every_setting_of_a_recipe() {
    let x = Xvfb::start(2);
    let dir = scratch("remix");
    let outputs = dir.join("out").to_string_lossy().into_owned();
    image::RgbImage::from_fn(40, 30, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 8) as u8, 90])
    })
    .save(dir.join("still.png"))
    .unwrap();
    let recipe = serde_json::json!({
        "format": "motif-recipe-v1",
        "prompt": "a blue cube on a wooden table",
        "negative": "blurry",
        "style": "anime",
        "model": model(),
        "image": dir.join("still.png").to_string_lossy(),
        "strength": 0.5,
        "width": 48,
        "height": 32,
        "frames": 3,
        "fps": 12.0,
        "steps": 2,
        "guidance": 3.5,
        "seed": 4242,
        "scheduler": "euler",
        "motion": 3.0,
        "camera": "pan-left",
    });
    std::fs::write(dir.join("r.json"), recipe.to_string()).unwrap();
    let out = view(
        &x,
        &dir,
        &[
            "--remix",
            "r.json",
            "--outputs",
            &outputs,
            "--auto-generate",
            "--screenshot",
            "r.png",
        ],
    );
    assert!(out.status.success());
    let written = PathBuf::from(line(&out, "recipe:").expect("the recipe's path is printed"));
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(written).unwrap()).unwrap();
    for (key, want) in recipe.as_object().unwrap() {
        assert_eq!(&got[key], want, "recipe field `{key}`");
    }
}

/// `motif view --server URL --token T`: the job runs on a `motif serve`, the
/// window shows its clip, saved (WebP and recipe) in the outputs folder.
#[test]
fn the_viewer_generates_on_a_server() {
    let x = Xvfb::start(5);
    let dir = scratch("remote");
    let data = dir.join("server-data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = Command::new(env!("CARGO_BIN_EXE_motif"))
        .args(["serve", "--data", data.to_str().unwrap(), "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .env_remove("MOTIF_DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Kill(&mut server);
    let start = Instant::now();
    while ureq::get(&format!("{base}/api/v1/health")).call().is_err() {
        assert!(start.elapsed() < Duration::from_secs(30), "no server");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A gallery member and a token of theirs, so the window can publish.
    let data_arg = data.to_str().unwrap();
    let mut create = Command::new(env!("CARGO_BIN_EXE_motif"))
        .args(["admin", "create-user", "wren", "--data", data_arg])
        .env_remove("MOTIF_DATABASE_URL")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(create.stdin.take().unwrap(), "wren's password").unwrap();
    assert!(create.wait().unwrap().success());
    let token = Command::new(env!("CARGO_BIN_EXE_motif"))
        .args([
            "admin",
            "create-token",
            "--user",
            "wren",
            "--data",
            data_arg,
        ])
        .env_remove("MOTIF_DATABASE_URL")
        .output()
        .unwrap();
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();

    let (m, outputs) = (model(), dir.join("out").to_string_lossy().into_owned());
    let out = view(
        &x,
        &dir,
        &tiny(
            &m,
            &outputs,
            &[
                "--server",
                &base,
                "--token",
                &token,
                "--screenshot",
                "remote.png",
                "--publish",
            ],
        ),
    );
    assert!(out.status.success());
    let clip = PathBuf::from(line(&out, "clip:").expect("the clip's path is printed"));
    assert!(clip.is_file() && clip.starts_with(&outputs), "{clip:?}");
    assert_eq!(clip.extension().unwrap(), "webp");
    assert!(clip.with_extension("json").is_file());
    let rect = clip_rect(&out);
    assert!(rect.2 >= 64 && rect.3 >= 64, "clip drawn at {rect:?}");
    // The job ran on the server, for this token.
    let jobs: serde_json::Value = ureq::get(&format!("{base}/api/v1/jobs?state=finished"))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let jobs = jobs["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(
        jobs[0]["request"]["prompt"],
        "a red ball bouncing on green grass"
    );
    assert_eq!(jobs[0]["request"]["seed"], 7);

    // Publish, pressed in the window, put it in the server's gallery.
    let page = line(&out, "published:").expect("the published page is printed");
    assert!(page.starts_with(&format!("{base}/clips/")), "{page}");
    let html = ureq::get(&page).call().unwrap().into_string().unwrap();
    assert!(html.contains("a red ball bouncing on green grass"));

    // A refused job is an error the viewer reports, not a hang.
    let out = view(
        &x,
        &dir,
        &tiny(
            &m,
            &outputs,
            &[
                "--server",
                &base,
                "--token",
                "motif_wrong",
                "--screenshot",
                "refused.png",
            ],
        ),
    );
    assert!(!out.status.success());
}

#[test]
fn a_second_generate_keeps_the_model_loaded() {
    let x = Xvfb::start(3);
    let dir = scratch("repeat");
    let (m, outputs) = (model(), dir.join("out").to_string_lossy().into_owned());
    let out = view(
        &x,
        &dir,
        &tiny(&m, &outputs, &["--repeat", "2", "--screenshot", "r.png"]),
    );
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let count = |prefix: &str| stdout.lines().filter(|l| l.starts_with(prefix)).count();
    assert_eq!(count("model loaded:"), 1, "the weights were read once");
    assert_eq!(count("model kept loaded:"), 1, "the second run reused them");
    assert_eq!(count("clip:"), 2);
    // Same seed, same second: two clips all the same, under two names.
    assert_eq!(clips_in(Path::new(&outputs)).len(), 2);
}

#[test]
fn the_window_works_under_wayland() {
    let Some(w) = Weston::start(4) else {
        return;
    };
    let dir = scratch("wayland");
    let (m, outputs) = (model(), dir.join("out").to_string_lossy().into_owned());
    let out = view_on(
        Display::Wayland(&w),
        &dir,
        &tiny(&m, &outputs, &["--screenshot", "w.png"]),
    );
    assert!(out.status.success());
    let clip = PathBuf::from(line(&out, "clip:").expect("the clip's path is printed"));
    let rect = clip_rect(&out);
    let shown = crop(&dir.join("w.png"), rect);
    let frame = image::imageops::resize(
        &last_frame(&clip, 64, 64),
        rect.2,
        rect.3,
        image::imageops::FilterType::Triangle,
    );
    let score = ncc(&shown, &frame);
    assert!(
        score >= 0.9,
        "NCC {score:.3} between the Wayland window and the clip"
    );
}

/// A Wan folder in the window: a 48x32, 5-frame (1 + 4k), 2-step Generate
/// at the family's own guidance and fps shows live previews (Wan's 16
/// latent channels through its preview projection) and then the saved clip;
/// a motion or camera setting Wan cannot take is the engine's refusal,
/// shown in the window, and the run fails without a clip.
#[test]
fn a_wan_model_generates_in_the_window() {
    let x = Xvfb::start(6);
    let dir = scratch("wan");
    let (m, outputs) = (wan(), dir.join("out").to_string_lossy().into_owned());
    let wan_sized = |extra: &[&'static str]| -> Vec<String> {
        let mut a: Vec<String> = tiny(&m, &outputs, &[])
            .into_iter()
            .map(str::to_string)
            .collect();
        for (flag, v) in [("--width", "48"), ("--height", "32"), ("--frames", "5")] {
            let i = a.iter().position(|s| s == flag).unwrap();
            a[i + 1] = v.to_string();
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        view(&x, &dir, &args)
    };

    // The preview after step 1 of 2 is drawn.
    let out = run(wan_sized(&[
        "--screenshot",
        "early.png",
        "--screenshot-at-step",
        "1",
    ]));
    assert!(out.status.success());
    let rect = clip_rect(&out);
    let early = crop(&dir.join("early.png"), rect);
    let (lo, hi) = early
        .as_raw()
        .iter()
        .fold((255u8, 0u8), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    assert!(hi - lo > 32, "the step-1 preview is flat ({lo}..{hi})");

    // The run to its end: the saved clip fills the window's clip rectangle.
    let out = run(wan_sized(&["--screenshot", "final.png"]));
    assert!(out.status.success());
    let clip = PathBuf::from(line(&out, "clip:").expect("the clip's path is printed"));
    assert!(clip.is_file() && clip.starts_with(&outputs));
    // Random weights make pixel-scale colour noise, which H.264's 4:2:0
    // chroma at 48x32 does not keep: the window is compared with the frames
    // as generated, from the sheet the viewer keeps beside its clips.
    let sheet = image::open(clip.with_extension("frames.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(sheet.dimensions(), (48, 5 * 32), "five 48x32 frames");
    let last = image::imageops::crop_imm(&sheet, 0, 4 * 32, 48, 32).to_image();
    let rect = clip_rect(&out);
    let shown = crop(&dir.join("final.png"), rect);
    let frame =
        image::imageops::resize(&last, rect.2, rect.3, image::imageops::FilterType::Triangle);
    let score = ncc(&shown, &frame);
    assert!(
        score >= 0.9,
        "NCC {score:.3} between the window and the clip"
    );
    // Wan's published guidance and fps, not AnimateDiff's.
    let written = PathBuf::from(line(&out, "recipe:").expect("the recipe's path is printed"));
    let recipe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(written).unwrap()).unwrap();
    assert_eq!(
        (&recipe["frames"], &recipe["guidance"], &recipe["fps"]),
        (
            &serde_json::json!(5),
            &serde_json::json!(5.0),
            &serde_json::json!(16.0)
        ),
        "{recipe}"
    );
    // The frames were decoded: 5 frames in the MP4.
    let raw = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(&clip)
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .unwrap();
    assert_eq!(raw.stdout.len(), 5 * 48 * 32 * 3);

    // Motion and a camera move are AnimateDiff's: refused by name, no clip.
    let before = clips_in(Path::new(&outputs)).len();
    let out = run(wan_sized(&[
        "--motion",
        "3",
        "--camera",
        "pan-left",
        "--screenshot",
        "refused.png",
    ]));
    assert_eq!(out.status.code(), Some(1), "a failed run, not a crash");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`motion` is not supported") && stderr.contains("Wan"),
        "{stderr}"
    );
    assert!(dir.join("refused.png").is_file());
    assert_eq!(clips_in(Path::new(&outputs)).len(), before);
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// Native image-to-video in the window: the panel says what each model
/// takes and enables the slots it has (image, last image); Wan2.1-I2V
/// animates the image slot's still and first-last frame ends on the last
/// one (tiny case-set folders, 48x32, 5 frames, 2 steps).
#[test]
fn image_to_video_models_animate_the_slots_stills() {
    let x = Xvfb::start(7);
    let dir = scratch("i2v");
    let outputs = dir.join("out").to_string_lossy().into_owned();
    for (name, tint) in [("first.png", 40u32), ("last.png", 220)] {
        image::RgbImage::from_fn(48, 32, |x, y| {
            image::Rgb([(x * 5) as u8, (y * 7) as u8, tint as u8])
        })
        .save(dir.join(name))
        .unwrap();
    }
    let (i2v, flf) = (fixture("wan-i2v"), fixture("wan-flf2v"));
    let wan_sized = |model: &str, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = tiny(model, &outputs, &[])
            .into_iter()
            .map(str::to_string)
            .collect();
        for (flag, v) in [("--width", "48"), ("--height", "32"), ("--frames", "5")] {
            let i = a.iter().position(|s| s == flag).unwrap();
            a[i + 1] = v.to_string();
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        view(&x, &dir, &args)
    };
    let recipe_of = |out: &Output| -> serde_json::Value {
        let written = PathBuf::from(line(out, "recipe:").expect("the recipe's path is printed"));
        serde_json::from_str(&std::fs::read_to_string(written).unwrap()).unwrap()
    };
    let frames_of = |out: &Output| -> image::RgbImage {
        let clip = PathBuf::from(line(out, "clip:").expect("the clip's path is printed"));
        image::open(clip.with_extension("frames.png"))
            .unwrap()
            .to_rgb8()
    };

    // What the panel offers, without generating: each model's line and slots.
    for (model, takes, slots) in [
        (
            model(),
            "text-to-video · image anchoring (first frame)",
            "image on, last image off",
        ),
        (wan(), "text-to-video", "image off, last image off"),
        (
            i2v.clone(),
            "image-to-video (needs an image)",
            "image on, last image off",
        ),
        (
            flf.clone(),
            "first-last frame (needs both images)",
            "image on, last image on",
        ),
    ] {
        let args = [
            "--model",
            &model,
            "--outputs",
            &outputs,
            "--screenshot",
            "panel.png",
        ];
        let out = view(&x, &dir, &args);
        assert!(out.status.success(), "{model}");
        assert_eq!(line(&out, "takes:").as_deref(), Some(takes), "{model}");
        assert_eq!(line(&out, "slots:").as_deref(), Some(slots), "{model}");
    }

    // Wan2.1-I2V animates the still in the image slot.
    let out = run(wan_sized(
        &i2v,
        &["--image", "first.png", "--screenshot", "i2v.png"],
    ));
    assert!(out.status.success());
    let recipe = recipe_of(&out);
    assert_eq!(
        (&recipe["image"], &recipe["last_image"]),
        (&serde_json::json!("first.png"), &serde_json::Value::Null),
        "{recipe}"
    );
    assert_eq!(frames_of(&out).dimensions(), (48, 5 * 32));

    // First-last frame takes both slots' stills.
    let out = run(wan_sized(
        &flf,
        &[
            "--image",
            "first.png",
            "--last-image",
            "last.png",
            "--screenshot",
            "flf.png",
        ],
    ));
    assert!(out.status.success());
    assert_eq!(
        line(&out, "slots:").as_deref(),
        Some("image on, last image on")
    );
    let recipe = recipe_of(&out);
    assert_eq!(
        (&recipe["image"], &recipe["last_image"]),
        (
            &serde_json::json!("first.png"),
            &serde_json::json!("last.png")
        ),
        "{recipe}"
    );
    assert_eq!(frames_of(&out).dimensions(), (48, 5 * 32));

    // An image-to-video model without its still: refused by name, no clip.
    let before = clips_in(Path::new(&outputs)).len();
    let out = run(wan_sized(&i2v, &["--screenshot", "refused.png"]));
    assert_eq!(out.status.code(), Some(1), "a failed run, not a crash");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("image-to-video model"), "{stderr}");
    assert_eq!(clips_in(Path::new(&outputs)).len(), before);
    let _ = std::fs::remove_dir_all(&dir);
}
