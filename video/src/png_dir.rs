//! A folder of lossless frames: `frame_0000.png`, `frame_0001.png`, ... and `recipe.json`.
//! Every frame also carries the recipe in an iTXt chunk (UTF-8, unlike tEXt's Latin-1), so a
//! single frame copied out of the folder still says how it was made.

use std::path::Path;

use crate::{atomic, Clip, VideoError};

pub(crate) const RECIPE_FILE: &str = "recipe.json";
const RECIPE_KEYWORD: &str = "motif-recipe";

fn frame_name(index: usize) -> String {
    format!("frame_{index:04}.png")
}

/// Names a PNG folder written by Motif may hold; only such a folder is replaced.
fn is_our_file_name(name: &str) -> bool {
    name == RECIPE_FILE
        || name
            .strip_prefix("frame_")
            .and_then(|rest| rest.strip_suffix(".png"))
            .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// The folder's files, (name, bytes), frames first and the recipe last.
pub(crate) fn encode(
    path: &Path,
    clip: &Clip,
    recipe: &str,
) -> Result<Vec<(String, Vec<u8>)>, VideoError> {
    let mut files = Vec::with_capacity(clip.frames.len() + 1);
    for (index, frame) in clip.frames.iter().enumerate() {
        let name = frame_name(index);
        let png = encode_frame(clip, frame, recipe).map_err(|error| VideoError::Encode {
            path: path.join(&name),
            codec: "PNG",
            message: error.to_string(),
        })?;
        files.push((name, png));
    }
    files.push((RECIPE_FILE.to_string(), recipe.as_bytes().to_vec()));
    Ok(files)
}

fn encode_frame(clip: &Clip, frame: &[u8], recipe: &str) -> Result<Vec<u8>, png::EncodingError> {
    let mut png = Vec::new();
    let mut encoder = png::Encoder::new(&mut png, clip.width, clip.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.add_itxt_chunk(RECIPE_KEYWORD.to_string(), recipe.to_string())?;
    let mut writer = encoder.write_header()?;
    writer.write_image_data(frame)?;
    writer.finish()?;
    Ok(png)
}

/// Writes the folder atomically, replacing an existing folder only if Motif wrote it.
pub(crate) fn write(path: &Path, files: &[(String, Vec<u8>)]) -> Result<(), VideoError> {
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        if !(metadata.is_dir() && holds_only_our_files(path)) {
            return Err(VideoError::NotOurFolder {
                path: path.to_path_buf(),
            });
        }
    }
    atomic::write_dir(path, files)
}

fn holds_only_our_files(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.into_iter().all(|entry| {
        entry.is_ok_and(|entry| {
            entry.file_type().is_ok_and(|t| t.is_file())
                && entry.file_name().to_str().is_some_and(is_our_file_name)
        })
    })
}

/// The recipe embedded in the folder's first frame.
pub(crate) fn read_recipe(path: &Path) -> Result<String, VideoError> {
    let frame_path = path.join(frame_name(0));
    let bytes = std::fs::read(&frame_path).map_err(|source| VideoError::Io {
        path: frame_path.clone(),
        action: "read the first frame of the PNG folder",
        source,
    })?;
    let malformed = || VideoError::Malformed {
        path: frame_path.clone(),
        expected: "a PNG image",
    };
    let reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .map_err(|_| malformed())?;
    let chunk = reader
        .info()
        .utf8_text
        .iter()
        .find(|chunk| chunk.keyword == RECIPE_KEYWORD)
        .ok_or_else(|| VideoError::NoRecipe {
            path: frame_path.clone(),
            expected: "an iTXt chunk named motif-recipe",
        })?;
    chunk.get_text().map_err(|_| malformed())
}
