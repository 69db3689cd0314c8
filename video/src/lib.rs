//! Writes generated clips to disk: H.264 MP4, GIF, animated WebP or a folder of PNG frames.
//!
//! The JSON recipe that made a clip is stored twice: embedded in the clip (so a clip copied
//! on its own still says how it was made) and in a sidecar `.json` beside it (so tools that
//! cannot read container metadata still find it). [`read_recipe`] reads either.
//!
//! [`shrink_mp4`] re-encodes an MP4 clip smaller, for upload limits.
//!
//! Writes are atomic: the clip is built in memory, written under a temporary name in the
//! same directory and renamed into place, so a failed or interrupted write never leaves a
//! half-written clip at the final path.

mod atomic;
mod gif;
mod mp4;
mod png_dir;
mod shrink;
mod webp;

use std::path::{Path, PathBuf};

/// A clip of RGB8 frames, as the pipeline produces it.
#[derive(Debug, Clone, PartialEq)]
pub struct Clip {
    pub width: u32,
    pub height: u32,
    /// Frames per second; any positive finite value (7.5 is fine).
    pub fps: f32,
    /// Each frame is `width * height * 3` bytes, RGB8, row-major, top row first.
    pub frames: Vec<Vec<u8>>,
}

/// The on-disk form of a clip, chosen by [`format_for`] from the output path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// H.264 (constrained baseline, yuv420p) in an MP4 file.
    Mp4,
    /// Animated GIF, 256 colours per frame, looping forever.
    Gif,
    /// Animated WebP, lossy at high quality, looping forever.
    Webp,
    /// A folder of `frame_0000.png`, `frame_0001.png`, ... plus `recipe.json`.
    PngDir,
}

/// The file extensions [`format_for`] accepts, for error messages.
const ACCEPTED: &str =
    "expected a path ending in .mp4, .gif or .webp, or a folder path (no extension, or ending in '/') for PNG frames";

/// Recipes are a prompt, a seed and a few settings; the cap keeps every container's
/// 32-bit length fields far from overflowing.
const MAX_RECIPE_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error("{}: unknown clip format; {accepted}", path.display())]
    UnknownFormat {
        path: PathBuf,
        accepted: &'static str,
    },

    #[error("{}: the clip has no frames; expected at least 1", path.display())]
    NoFrames { path: PathBuf },

    #[error("{}: frame size {width}x{height}; expected width and height of at least 1", path.display())]
    EmptyFrame {
        path: PathBuf,
        width: u32,
        height: u32,
    },

    #[error(
        "{}: frame {index} has {found} bytes; expected {expected} ({width}x{height} RGB8, 3 bytes per pixel)",
        path.display()
    )]
    FrameLength {
        path: PathBuf,
        index: usize,
        found: usize,
        expected: usize,
        width: u32,
        height: u32,
    },

    #[error("{}: fps {fps} cannot be stored; expected {expected}", path.display())]
    Fps {
        path: PathBuf,
        fps: f32,
        expected: &'static str,
    },

    #[error("{}: {side} {value} is odd; H.264 yuv420p needs even width and height", path.display())]
    OddSize {
        path: PathBuf,
        side: &'static str,
        value: u32,
    },

    #[error("{}: frame size {width}x{height} is too large; expected {expected}", path.display())]
    TooLarge {
        path: PathBuf,
        width: u32,
        height: u32,
        expected: &'static str,
    },

    #[error("{}: recipe is {found} bytes; expected at most {MAX_RECIPE_BYTES}", path.display())]
    RecipeTooLarge { path: PathBuf, found: usize },

    #[error("{}: {codec} encoder failed: {message}", path.display())]
    Encode {
        path: PathBuf,
        codec: &'static str,
        message: String,
    },

    #[error("{}: cannot {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },

    #[error(
        "{}: exists and is not a PNG folder written by Motif (only frame_NNNN.png and recipe.json); refusing to replace it",
        path.display()
    )]
    NotOurFolder { path: PathBuf },

    #[error("{}: no Motif recipe found; expected {expected}", path.display())]
    NoRecipe {
        path: PathBuf,
        expected: &'static str,
    },

    #[error("{}: malformed file; expected {expected}", path.display())]
    Malformed {
        path: PathBuf,
        expected: &'static str,
    },

    #[error("MP4 to shrink: not an MP4 file: {message}")]
    NotMp4 { message: String },

    #[error("MP4 to shrink: no video track; expected an H.264 video track")]
    NoVideoTrack,

    #[error("MP4 to shrink: the video is {found}; expected H.264 (avc1)")]
    NotH264 { found: String },

    #[error("MP4 to shrink: the video has {found}; expected {expected}")]
    UnsupportedVideo {
        found: String,
        expected: &'static str,
    },

    #[error("MP4 to shrink: H.264 decoding failed: {message}")]
    Decode { message: String },

    #[error("MP4 to shrink: {codec} encoder failed: {message}")]
    Reencode {
        codec: &'static str,
        message: String,
    },
}

/// Picks the format from the path: `.mp4`, `.gif`, `.webp` (any case), or a PNG folder for
/// a path with no extension or ending in `/`.
pub fn format_for(path: &Path) -> Result<Format, VideoError> {
    let unknown = || VideoError::UnknownFormat {
        path: path.to_path_buf(),
        accepted: ACCEPTED,
    };
    if path.as_os_str().is_empty() {
        return Err(unknown());
    }
    if ends_with_separator(path) {
        return Ok(Format::PngDir);
    }
    let Some(extension) = path.extension() else {
        return Ok(Format::PngDir);
    };
    match extension.to_string_lossy().to_ascii_lowercase().as_str() {
        "mp4" => Ok(Format::Mp4),
        "gif" => Ok(Format::Gif),
        "webp" => Ok(Format::Webp),
        _ => Err(unknown()),
    }
}

/// Where [`write_clip`] puts the recipe beside the clip: `clip.mp4` -> `clip.json` in the same
/// directory; a PNG folder `out/clip` -> `out/clip/recipe.json`.
pub fn sidecar_path(path: &Path) -> PathBuf {
    match format_for(path) {
        Ok(Format::PngDir) => path.join(png_dir::RECIPE_FILE),
        _ => path.with_extension("json"),
    }
}

/// Writes `clip` at `path` in the format [`format_for`] picks, with `recipe_json` embedded in
/// it and written to [`sidecar_path`]. An existing file is overwritten; an existing PNG folder
/// is replaced only if it holds nothing but Motif's frames and recipe.
///
/// The clip is validated and fully encoded in memory before any file is created, then written
/// under temporary names and renamed into place. On error no temporary file remains, nothing
/// new is left at `path` or the sidecar path, and a failure before the rename leaves a
/// previous clip there untouched.
pub fn write_clip(path: &Path, clip: &Clip, recipe_json: &str) -> Result<(), VideoError> {
    let format = format_for(path)?;
    validate(path, clip)?;
    if recipe_json.len() > MAX_RECIPE_BYTES {
        return Err(VideoError::RecipeTooLarge {
            path: path.to_path_buf(),
            found: recipe_json.len(),
        });
    }
    let encoded = match format {
        Format::Mp4 => mp4::encode(path, clip, recipe_json)?,
        Format::Gif => gif::encode(path, clip, recipe_json)?,
        Format::Webp => webp::encode(path, clip, recipe_json)?,
        Format::PngDir => {
            let files = png_dir::encode(path, clip, recipe_json)?;
            return png_dir::write(path, &files);
        }
    };
    atomic::write_file_with_sidecar(path, &encoded, &sidecar_path(path), recipe_json.as_bytes())
}

/// Reads the recipe back: the whole text of a `.json` file, or the recipe embedded in an
/// `.mp4`, `.gif`, `.webp` or PNG folder written by [`write_clip`].
pub fn read_recipe(path: &Path) -> Result<String, VideoError> {
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if is_json && !ends_with_separator(path) {
        return std::fs::read_to_string(path).map_err(|source| VideoError::Io {
            path: path.to_path_buf(),
            action: "read recipe",
            source,
        });
    }
    let format = format_for(path).map_err(|_| VideoError::UnknownFormat {
        path: path.to_path_buf(),
        accepted: "expected a .json recipe, or an .mp4, .gif, .webp or PNG folder written by Motif",
    })?;
    match format {
        Format::Mp4 => mp4::read_recipe(path, &read_clip_bytes(path)?),
        Format::Gif => gif::read_recipe(path, &read_clip_bytes(path)?),
        Format::Webp => webp::read_recipe(path, &read_clip_bytes(path)?),
        Format::PngDir => png_dir::read_recipe(path),
    }
}

/// Re-encodes an MP4 clip written by [`write_clip`] so that it takes at most `max_bytes`,
/// keeping its frame rate, frame count and embedded recipe: first coarser quantisers at full
/// size (QP 28, then 34; the writer uses 18), then half size (each side halved and rounded
/// down to even, 2x2 box filter) at QP 30, then 40. Returns the first attempt that fits, or
/// Ok(None) when none does. A clip that already fits comes back unchanged, once its video
/// track has been checked to be H.264.
///
/// Only the first video track is kept (the writer makes no other tracks). Errors name what
/// the input lacks: an MP4 structure, a video track, H.264, a constant frame rate, even
/// sides, or samples that decode.
pub fn shrink_mp4(mp4: &[u8], max_bytes: usize) -> Result<Option<Vec<u8>>, VideoError> {
    shrink::shrink(mp4, max_bytes)
}

fn read_clip_bytes(path: &Path) -> Result<Vec<u8>, VideoError> {
    std::fs::read(path).map_err(|source| VideoError::Io {
        path: path.to_path_buf(),
        action: "read clip",
        source,
    })
}

fn ends_with_separator(path: &Path) -> bool {
    path.as_os_str()
        .as_encoded_bytes()
        .last()
        .is_some_and(|&b| std::path::is_separator(b as char))
}

/// Checks what every format needs. Each encoder checks its own limits (even sizes for H.264,
/// delays a GIF can express, ...) before it starts; all encoding happens in memory, before
/// any file is created.
fn validate(path: &Path, clip: &Clip) -> Result<(), VideoError> {
    let path_buf = || path.to_path_buf();
    if clip.frames.is_empty() {
        return Err(VideoError::NoFrames { path: path_buf() });
    }
    if clip.width == 0 || clip.height == 0 {
        return Err(VideoError::EmptyFrame {
            path: path_buf(),
            width: clip.width,
            height: clip.height,
        });
    }
    if !(clip.fps.is_finite() && clip.fps > 0.0) {
        return Err(VideoError::Fps {
            path: path_buf(),
            fps: clip.fps,
            expected: "a finite number above 0",
        });
    }
    let expected = (clip.width as usize)
        .checked_mul(clip.height as usize)
        .and_then(|pixels| pixels.checked_mul(3))
        .ok_or(VideoError::TooLarge {
            path: path_buf(),
            width: clip.width,
            height: clip.height,
            expected: "width * height * 3 to fit in memory",
        })?;
    for (index, frame) in clip.frames.iter().enumerate() {
        if frame.len() != expected {
            return Err(VideoError::FrameLength {
                path: path_buf(),
                index,
                found: frame.len(),
                expected,
                width: clip.width,
                height: clip.height,
            });
        }
    }
    Ok(())
}

/// Frame `i` starts at `round(i * units_per_second / fps)`: rounding the start times rather
/// than each duration keeps the average rate exact when `units / fps` is fractional
/// (8 fps in centiseconds gives delays 13, 12, 13, 12, ...).
fn frame_start(index: usize, fps: f32, units_per_second: f64) -> f64 {
    (index as f64 * units_per_second / fps as f64).round()
}
