//! Helpers shared by the integration tests: synthetic clips, scratch folders, ffmpeg.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use motif_video::Clip;

/// A folder under the system temp dir, removed on drop.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("motif-video-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create test folder");
        TestDir(path)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Sorted names of everything in the folder, hidden temporary files included.
    pub fn names(&self) -> Vec<String> {
        list(&self.0)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list folder")
        .map(|entry| {
            entry
                .expect("folder entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Frames that differ from each other and from frame to frame: a red/green gradient, a blue
/// level that rises with the frame index, and a square of a different colour that moves.
pub fn synthetic_clip(width: u32, height: u32, frames: usize, fps: f32) -> Clip {
    const SQUARE_COLOURS: [[u8; 3]; 4] = [[255, 255, 255], [0, 0, 0], [250, 30, 30], [20, 40, 240]];
    let (w, h) = (width as usize, height as usize);
    let frames = (0..frames)
        .map(|k| {
            let mut rgb = Vec::with_capacity(w * h * 3);
            let (square_x, square_y) = (4 + 9 * k % w.max(1), 3 + 5 * k % h.max(1));
            for y in 0..h {
                for x in 0..w {
                    let in_square = (square_x..square_x + 12).contains(&x)
                        && (square_y..square_y + 12).contains(&y);
                    if in_square {
                        rgb.extend_from_slice(&SQUARE_COLOURS[k % SQUARE_COLOURS.len()]);
                    } else {
                        rgb.push((x * 255 / w.max(2).saturating_sub(1)) as u8);
                        rgb.push((y * 255 / h.max(2).saturating_sub(1)) as u8);
                        rgb.push((30 + 50 * k % 200) as u8);
                    }
                }
            }
            rgb
        })
        .collect();
    Clip {
        width,
        height,
        fps,
        frames,
    }
}

/// A recipe with everything an embedding could mangle: quotes, XML and JSON specials, line
/// breaks (a raw CRLF at the end, which XML readers would turn into LF), non-ASCII text, and
/// more than one 255-byte GIF sub-block.
pub fn recipe() -> String {
    let recipe = serde_json::json!({
        "prompt": "a <red> fox & a \"grey\" cat — 狐と猫, ü\r\n".repeat(12),
        "negative_prompt": "blurry > sharp; 'quoted'",
        "seed": 1234567,
        "steps": 25,
        "guidance_scale": 7.5,
    });
    serde_json::to_string_pretty(&recipe).expect("serialise recipe") + "\r\n"
}

/// Mean absolute difference per channel, in 0..=255 units.
pub fn mean_abs_error(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len(), "compared buffers differ in length");
    let total: u64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as i32 - y as i32).unsigned_abs() as u64)
        .sum();
    total as f64 / a.len() as f64
}

pub fn rgba_to_rgb(rgba: &[u8]) -> Vec<u8> {
    rgba.chunks_exact(4)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect()
}

/// Runs an ffmpeg tool and returns its stdout; fails the test (never skips it) when the tool
/// is missing, because then nothing checks that our MP4s play.
pub fn run_ffmpeg_tool(tool: &str, args: &[&str]) -> Vec<u8> {
    let output = Command::new(tool).args(args).output().unwrap_or_else(|error| {
        panic!("could not run {tool} ({error}): install ffmpeg (e.g. `apt-get install ffmpeg`; CI installs it), the MP4 tests need ffprobe and ffmpeg")
    });
    assert!(
        output.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

pub fn ffprobe(path: &Path) -> serde_json::Value {
    let path = path.to_str().expect("UTF-8 test path");
    let json = run_ffmpeg_tool(
        "ffprobe",
        &[
            "-v",
            "error",
            "-count_frames",
            "-show_streams",
            "-show_format",
            "-of",
            "json",
            path,
        ],
    );
    serde_json::from_slice(&json).expect("ffprobe prints JSON")
}

/// Every frame of the MP4 decoded by ffmpeg to RGB8, concatenated.
pub fn ffmpeg_decode_rgb(path: &Path) -> Vec<u8> {
    let path = path.to_str().expect("UTF-8 test path");
    run_ffmpeg_tool(
        "ffmpeg",
        &[
            "-v", "error", "-i", path, "-f", "rawvideo", "-pix_fmt", "rgb24", "-",
        ],
    )
}
