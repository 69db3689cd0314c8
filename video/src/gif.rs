//! Animated GIF: a 256-colour palette per frame chosen by NeuQuant (the gif crate's
//! `from_rgb_speed`), looping forever, the recipe in a Comment extension.

use std::path::Path;

use ::gif::{AnyExtension, Encoder, EncodingError, Extension, Frame, Repeat};

use crate::{frame_start, Clip, VideoError};

/// NeuQuant samples every `speed`-th pixel: 1 is best and slowest, 30 fastest; 10 is the
/// gif crate's recommended balance.
const QUANTIZER_SPEED: i32 = 10;
/// GIF frame delays are whole centiseconds.
const CENTISECONDS_PER_SECOND: f64 = 100.0;
/// Browsers replace delays under 2 cs with 10 cs, so a faster GIF would play slower.
const MIN_DELAY_CS: f64 = 2.0;
/// The delay field is 16 bits; one less leaves room for the start-time rounding.
const MAX_DELAY_CS: f64 = (u16::MAX - 1) as f64;

const BLOCK_EXTENSION: u8 = 0x21;
const BLOCK_IMAGE: u8 = 0x2C;
const BLOCK_TRAILER: u8 = 0x3B;

pub(crate) fn encode(path: &Path, clip: &Clip, recipe: &str) -> Result<Vec<u8>, VideoError> {
    let (Ok(width), Ok(height)) = (u16::try_from(clip.width), u16::try_from(clip.height)) else {
        return Err(VideoError::TooLarge {
            path: path.to_path_buf(),
            width: clip.width,
            height: clip.height,
            expected: "at most 65535x65535 for GIF",
        });
    };
    let delay = CENTISECONDS_PER_SECOND / clip.fps as f64;
    if !(MIN_DELAY_CS..=MAX_DELAY_CS).contains(&delay) {
        return Err(VideoError::Fps {
            path: path.to_path_buf(),
            fps: clip.fps,
            expected: "between 0.0016 and 50 for GIF (frame delays are whole centiseconds, and browsers slow down delays under 2 cs)",
        });
    }
    encode_frames(clip, width, height, recipe).map_err(|error| VideoError::Encode {
        path: path.to_path_buf(),
        codec: "GIF",
        message: error.to_string(),
    })
}

fn encode_frames(
    clip: &Clip,
    width: u16,
    height: u16,
    recipe: &str,
) -> Result<Vec<u8>, EncodingError> {
    let mut gif = Vec::new();
    // No global palette: every frame brings its own.
    let mut encoder = Encoder::new(&mut gif, width, height, &[])?;
    encoder.set_repeat(Repeat::Infinite)?;
    encoder.write_raw_extension(AnyExtension(Extension::Comment as u8), &[recipe.as_bytes()])?;
    for (index, rgb) in clip.frames.iter().enumerate() {
        let mut frame = Frame::from_rgb_speed(width, height, rgb, QUANTIZER_SPEED);
        let delay = frame_start(index + 1, clip.fps, CENTISECONDS_PER_SECOND)
            - frame_start(index, clip.fps, CENTISECONDS_PER_SECOND);
        frame.delay = delay as u16;
        encoder.write_frame(&frame)?;
    }
    encoder.into_inner()?;
    Ok(gif)
}

/// The first Comment extension, found by walking the GIF's blocks (the gif crate's decoder
/// skips comments).
pub(crate) fn read_recipe(path: &Path, gif: &[u8]) -> Result<String, VideoError> {
    let malformed = || VideoError::Malformed {
        path: path.to_path_buf(),
        expected: "a GIF file (header, screen descriptor, blocks, trailer)",
    };
    if !(gif.starts_with(b"GIF87a") || gif.starts_with(b"GIF89a")) {
        return Err(malformed());
    }
    // Header (6 bytes) and logical screen descriptor (7), whose 5th byte flags a global palette.
    let screen_flags = *gif.get(10).ok_or_else(malformed)?;
    let mut at = 13 + palette_len(screen_flags);
    loop {
        match gif.get(at) {
            Some(&BLOCK_EXTENSION) => {
                let label = *gif.get(at + 1).ok_or_else(malformed)?;
                let (blocks, next) = sub_blocks(gif, at + 2).ok_or_else(malformed)?;
                if label == Extension::Comment as u8 {
                    return String::from_utf8(blocks.concat()).map_err(|_| VideoError::Malformed {
                        path: path.to_path_buf(),
                        expected: "a UTF-8 recipe in the GIF comment",
                    });
                }
                at = next;
            }
            Some(&BLOCK_IMAGE) => {
                // Image descriptor (10 bytes, flags last), local palette, LZW code size byte.
                let image_flags = *gif.get(at + 9).ok_or_else(malformed)?;
                let data_start = at + 10 + palette_len(image_flags) + 1;
                at = sub_blocks(gif, data_start).ok_or_else(malformed)?.1;
            }
            Some(&BLOCK_TRAILER) => {
                return Err(VideoError::NoRecipe {
                    path: path.to_path_buf(),
                    expected: "a GIF comment extension",
                })
            }
            _ => return Err(malformed()),
        }
    }
}

fn palette_len(flags: u8) -> usize {
    if flags & 0x80 == 0 {
        0
    } else {
        3 << ((flags & 0x07) + 1)
    }
}

/// The data sub-blocks starting at `at` (each a length byte and that many bytes, ended by a
/// zero length), and the index just past them.
fn sub_blocks(gif: &[u8], mut at: usize) -> Option<(Vec<&[u8]>, usize)> {
    let mut blocks = Vec::new();
    loop {
        let len = *gif.get(at)? as usize;
        at += 1;
        if len == 0 {
            return Some((blocks, at));
        }
        blocks.push(gif.get(at..at + len)?);
        at += len;
    }
}
