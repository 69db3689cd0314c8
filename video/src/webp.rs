//! Animated WebP through libwebp's animation encoder: lossy at high quality (diffusion output is
//! photographic, which lossless WebP compresses poorly), looping forever, the recipe in an XMP
//! chunk added after libwebp has assembled the file.

use std::path::Path;

use webp_animation::{
    AnimParams, ColorMode, Encoder, EncoderOptions, EncodingConfig, EncodingType,
    LossyEncodingConfig,
};

use crate::{frame_start, Clip, VideoError};

/// libwebp quality 0..100; high, because clips are short and generated detail is the point.
const QUALITY: f32 = 90.0;
/// libwebp's speed/size trade-off, 0 (fast) ..= 6 (small); 4 is its default.
const METHOD: usize = 4;
/// The VP8X canvas size fields hold 14 bits for VP8/VP8L frames.
const MAX_SIDE: u32 = 16383;
/// WebP frame timestamps are whole milliseconds.
const MS_PER_SECOND: f64 = 1000.0;

/// VP8X feature flags (WebP container specification): bit 2 announces an XMP chunk.
const VP8X_FLAG_XMP: u8 = 0x04;
/// RIFF header: "RIFF", 32-bit size of what follows, "WEBP"; the first chunk starts after it.
const RIFF_HEADER_LEN: usize = 12;
const CHUNK_HEADER_LEN: usize = 8;

const XMP_NAMESPACE: &str = "urn:motif:xmp:1.0/";
const RECIPE_OPEN: &str = "<motif:recipe>";
const RECIPE_CLOSE: &str = "</motif:recipe>";

pub(crate) fn encode(path: &Path, clip: &Clip, recipe: &str) -> Result<Vec<u8>, VideoError> {
    if clip.width > MAX_SIDE || clip.height > MAX_SIDE {
        return Err(VideoError::TooLarge {
            path: path.to_path_buf(),
            width: clip.width,
            height: clip.height,
            expected: "at most 16383x16383 for WebP",
        });
    }
    let end_ms = frame_start(clip.frames.len(), clip.fps, MS_PER_SECOND);
    if MS_PER_SECOND / (clip.fps as f64) < 1.0 || end_ms > i32::MAX as f64 {
        return Err(VideoError::Fps {
            path: path.to_path_buf(),
            fps: clip.fps,
            expected: "at most 1000 for WebP (timestamps are whole milliseconds), and a clip shorter than 24 days",
        });
    }
    let encode_error = |error: webp_animation::Error| VideoError::Encode {
        path: path.to_path_buf(),
        codec: "WebP",
        message: error.to_string(),
    };
    let options = EncoderOptions {
        anim_params: AnimParams { loop_count: 0 }, // 0 = forever
        color_mode: ColorMode::Rgb,
        encoding_config: Some(EncodingConfig {
            encoding_type: EncodingType::Lossy(LossyEncodingConfig {
                // Sharp RGB->YUV keeps saturated edges from bleeding at 4:2:0.
                use_sharp_yuv: true,
                ..LossyEncodingConfig::new_from_photo_preset()
            }),
            quality: QUALITY,
            method: METHOD,
        }),
        ..EncoderOptions::default()
    };
    let mut encoder =
        Encoder::new_with_options((clip.width, clip.height), options).map_err(encode_error)?;
    for (index, frame) in clip.frames.iter().enumerate() {
        let start_ms = frame_start(index, clip.fps, MS_PER_SECOND) as i32;
        encoder.add_frame(frame, start_ms).map_err(encode_error)?;
    }
    let webp = encoder.finalize(end_ms as i32).map_err(encode_error)?;
    with_xmp(&webp, clip, xmp_packet(recipe).as_bytes()).ok_or_else(|| VideoError::Encode {
        path: path.to_path_buf(),
        codec: "WebP",
        message: "libwebp returned a file that does not start with a RIFF/WEBP header and a VP8X, VP8 or VP8L chunk"
            .to_string(),
    })
}

/// Appends an XMP chunk and announces it in the VP8X header. libwebp assembles a one-frame
/// animation as a still image (a bare VP8/VP8L chunk), which gets a VP8X header here.
fn with_xmp(webp: &[u8], clip: &Clip, xmp: &[u8]) -> Option<Vec<u8>> {
    if webp.get(0..4)? != b"RIFF" || webp.get(8..12)? != b"WEBP" {
        return None;
    }
    let mut out = Vec::with_capacity(webp.len() + 2 * CHUNK_HEADER_LEN + 10 + xmp.len() + 1);
    out.extend_from_slice(&webp[..RIFF_HEADER_LEN]);
    match webp.get(RIFF_HEADER_LEN..RIFF_HEADER_LEN + 4)? {
        b"VP8X" => {
            out.extend_from_slice(&webp[RIFF_HEADER_LEN..]);
            out[RIFF_HEADER_LEN + CHUNK_HEADER_LEN] |= VP8X_FLAG_XMP;
        }
        b"VP8 " | b"VP8L" => {
            // VP8X payload: flags, 3 reserved bytes, canvas width - 1 and height - 1 (24 bits LE).
            let mut vp8x = vec![VP8X_FLAG_XMP, 0, 0, 0];
            vp8x.extend_from_slice(&(clip.width - 1).to_le_bytes()[..3]);
            vp8x.extend_from_slice(&(clip.height - 1).to_le_bytes()[..3]);
            push_chunk(&mut out, b"VP8X", &vp8x)?;
            out.extend_from_slice(&webp[RIFF_HEADER_LEN..]);
        }
        _ => return None,
    }
    push_chunk(&mut out, b"XMP ", xmp)?;
    let riff_size = u32::try_from(out.len() - 8).ok()?;
    out[4..8].copy_from_slice(&riff_size.to_le_bytes());
    Some(out)
}

fn push_chunk(out: &mut Vec<u8>, fourcc: &[u8; 4], payload: &[u8]) -> Option<()> {
    out.extend_from_slice(fourcc);
    out.extend_from_slice(&u32::try_from(payload.len()).ok()?.to_le_bytes());
    out.extend_from_slice(payload);
    // RIFF chunks start at even offsets.
    if payload.len() % 2 == 1 {
        out.push(0);
    }
    Some(())
}

fn xmp_packet(recipe: &str) -> String {
    format!(
        "<?xpacket begin=\"\u{feff}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>\
         <x:xmpmeta xmlns:x=\"adobe:ns:meta/\">\
         <rdf:RDF xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\">\
         <rdf:Description rdf:about=\"\" xmlns:motif=\"{XMP_NAMESPACE}\">\
         {RECIPE_OPEN}{}{RECIPE_CLOSE}\
         </rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end=\"r\"?>",
        xml_escape(recipe)
    )
}

fn xml_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            // XML readers turn a literal CR into LF; a character reference survives.
            '\r' => escaped.push_str("&#13;"),
            _ => escaped.push(c),
        }
    }
    escaped
}

/// Undoes XML's predefined entities and numeric character references.
fn xml_unescape(text: &str) -> Option<String> {
    let mut plain = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        plain.push_str(&rest[..amp]);
        let semicolon = rest[amp..].find(';')? + amp;
        let c = match &rest[amp + 1..semicolon] {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            reference => {
                let number = reference.strip_prefix('#')?;
                let code = match number.strip_prefix('x') {
                    Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                    None => number.parse().ok()?,
                };
                char::from_u32(code)?
            }
        };
        plain.push(c);
        rest = &rest[semicolon + 1..];
    }
    plain.push_str(rest);
    Some(plain)
}

pub(crate) fn read_recipe(path: &Path, webp: &[u8]) -> Result<String, VideoError> {
    let malformed = |expected| VideoError::Malformed {
        path: path.to_path_buf(),
        expected,
    };
    if webp.get(0..4) != Some(b"RIFF") || webp.get(8..12) != Some(b"WEBP") {
        return Err(malformed("a RIFF/WEBP header"));
    }
    let mut at = RIFF_HEADER_LEN;
    while at < webp.len() {
        let header = webp
            .get(at..at + CHUNK_HEADER_LEN)
            .ok_or_else(|| malformed("whole RIFF chunks"))?;
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let payload = webp
            .get(at + CHUNK_HEADER_LEN..at + CHUNK_HEADER_LEN + len)
            .ok_or_else(|| malformed("whole RIFF chunks"))?;
        if &header[..4] == b"XMP " {
            let xmp = std::str::from_utf8(payload).map_err(|_| malformed("UTF-8 XMP"))?;
            let Some(start) = xmp.find(RECIPE_OPEN) else {
                break;
            };
            let body = &xmp[start + RECIPE_OPEN.len()..];
            let end = body
                .find(RECIPE_CLOSE)
                .ok_or_else(|| malformed("a closed motif:recipe element in the XMP"))?;
            return xml_unescape(&body[..end])
                .ok_or_else(|| malformed("well-formed XML entities in motif:recipe"));
        }
        at += CHUNK_HEADER_LEN + len + len % 2;
    }
    Err(VideoError::NoRecipe {
        path: path.to_path_buf(),
        expected: "an XMP chunk holding motif:recipe",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_escape_round_trips() {
        let text = "{\"a\":\"<b> & 'c' \\\"d\\\" \r\n é 狐\"}";
        assert_eq!(xml_unescape(&xml_escape(text)).as_deref(), Some(text));
        assert_eq!(
            xml_unescape("&#x41;&#66;&quot;&apos;").as_deref(),
            Some("AB\"'")
        );
        assert_eq!(xml_unescape("&bogus;"), None);
    }
}
