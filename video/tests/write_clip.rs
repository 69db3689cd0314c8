//! Every format written, then read back with an independent decoder: ffprobe/ffmpeg for MP4,
//! the gif crate, libwebp's animation decoder, the png crate. Recipes round-trip through the
//! embedded metadata and through the sidecar.

mod common;

use std::path::Path;

use common::{
    ffmpeg_decode_rgb, ffprobe, mean_abs_error, recipe, rgba_to_rgb, synthetic_clip, TestDir,
};
use motif_video::{format_for, read_recipe, sidecar_path, write_clip, Clip, Format};

/// H.264 and WebP are lossy: mean error per channel must stay under this (0..255 units).
const MAX_LOSSY_ERROR: f64 = 8.0;

fn frame_rate(fps_field: &serde_json::Value) -> f64 {
    let text = fps_field
        .as_str()
        .expect("frame rate is a string like 15/2");
    let (num, den) = text.split_once('/').expect("frame rate is a fraction");
    num.parse::<f64>().expect("numerator") / den.parse::<f64>().expect("denominator")
}

fn check_mp4(fps: f32) {
    let dir = TestDir::new("mp4");
    let path = dir.join("clip.mp4");
    let clip = synthetic_clip(64, 48, 4, fps);
    write_clip(&path, &clip, &recipe()).expect("write MP4");

    let probe = ffprobe(&path);
    let stream = &probe["streams"][0];
    assert_eq!(
        probe["streams"].as_array().map(Vec::len),
        Some(1),
        "one stream: {probe}"
    );
    assert_eq!(stream["codec_name"], "h264");
    assert_eq!(stream["pix_fmt"], "yuv420p");
    assert_eq!(stream["width"], clip.width);
    assert_eq!(stream["height"], clip.height);
    assert_eq!(
        stream["nb_frames"],
        clip.frames.len().to_string(),
        "frames in the sample table"
    );
    assert_eq!(
        stream["nb_read_frames"],
        clip.frames.len().to_string(),
        "frames the decoder returned"
    );
    for field in ["r_frame_rate", "avg_frame_rate"] {
        let rate = frame_rate(&stream[field]);
        assert!(
            (rate - fps as f64).abs() < 1e-6,
            "{field} {rate}, expected {fps}"
        );
    }
    assert_eq!(
        probe["format"]["tags"]["comment"],
        recipe(),
        "ffprobe reads the recipe as the comment tag"
    );

    let decoded = ffmpeg_decode_rgb(&path);
    let frame_len = clip.frames[0].len();
    assert_eq!(
        decoded.len(),
        frame_len * clip.frames.len(),
        "ffmpeg decoded a different number of frames"
    );
    for (index, (decoded, original)) in decoded.chunks(frame_len).zip(&clip.frames).enumerate() {
        let error = mean_abs_error(decoded, original);
        assert!(
            error < MAX_LOSSY_ERROR,
            "frame {index}: mean abs error {error:.2}/255"
        );
    }

    assert_eq!(read_recipe(&path).expect("recipe from MP4"), recipe());
    assert_eq!(
        read_recipe(&sidecar_path(&path)).expect("recipe from sidecar"),
        recipe()
    );
    assert_eq!(
        dir.names(),
        ["clip.json", "clip.mp4"],
        "no temporary files left"
    );
}

#[test]
fn mp4_at_integer_fps_reads_back_in_ffmpeg() {
    check_mp4(8.0);
    check_mp4(24.0);
}

#[test]
fn mp4_at_fractional_fps_reads_back_in_ffmpeg() {
    check_mp4(7.5);
}

#[test]
fn mp4_puts_moov_before_mdat() {
    let dir = TestDir::new("mp4-faststart");
    let path = dir.join("clip.mp4");
    write_clip(&path, &synthetic_clip(64, 48, 4, 8.0), &recipe()).expect("write MP4");
    let bytes = std::fs::read(&path).expect("read MP4");
    let mut order = Vec::new();
    let mut at = 0;
    while at + 8 <= bytes.len() {
        let size = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let size = if size == 1 {
            u64::from_be_bytes(bytes[at + 8..at + 16].try_into().unwrap()) as usize
        } else {
            size
        };
        order.push(String::from_utf8_lossy(&bytes[at + 4..at + 8]).into_owned());
        assert!(size >= 8, "box {} has size {size}", order.last().unwrap());
        at += size;
    }
    assert_eq!(at, bytes.len(), "top-level boxes tile the file");
    let position = |name: &str| {
        order
            .iter()
            .position(|b| b == name)
            .unwrap_or_else(|| panic!("no {name} in {order:?}"))
    };
    assert!(
        position("moov") < position("mdat"),
        "top-level boxes {order:?}"
    );
}

#[test]
fn gif_decodes_with_timing_loop_and_colours() {
    let dir = TestDir::new("gif");
    let path = dir.join("clip.gif");
    let clip = synthetic_clip(64, 48, 4, 8.0);
    write_clip(&path, &clip, &recipe()).expect("write GIF");

    let mut options = gif::DecodeOptions::new();
    options.set_color_output(gif::ColorOutput::RGBA);
    let file = std::fs::File::open(&path).expect("open GIF");
    let mut decoder = options
        .read_info(std::io::BufReader::new(file))
        .expect("GIF header");
    assert_eq!(
        (decoder.width() as u32, decoder.height() as u32),
        (clip.width, clip.height)
    );
    let mut delays = Vec::new();
    let mut count = 0;
    while let Some(frame) = decoder.read_next_frame().expect("GIF frame") {
        assert_eq!(
            (frame.width as u32, frame.height as u32),
            (clip.width, clip.height),
            "full-size frames"
        );
        let error = mean_abs_error(&rgba_to_rgb(&frame.buffer), &clip.frames[count]);
        assert!(
            error < MAX_LOSSY_ERROR,
            "frame {count}: mean abs error {error:.2}/255"
        );
        delays.push(frame.delay as f64);
        count += 1;
    }
    assert_eq!(decoder.repeat(), gif::Repeat::Infinite);
    assert_eq!(count, clip.frames.len());
    let ideal = 100.0 / clip.fps as f64;
    assert!(
        delays.iter().all(|d| (d - ideal).abs() <= 0.5),
        "delays {delays:?} cs, ideal {ideal}"
    );
    let total: f64 = delays.iter().sum();
    assert!(
        (total - ideal * count as f64).abs() <= 0.5,
        "delays {delays:?} drift from {ideal} cs"
    );

    assert_eq!(read_recipe(&path).expect("recipe from GIF"), recipe());
    assert_eq!(
        read_recipe(&sidecar_path(&path)).expect("recipe from sidecar"),
        recipe()
    );
    assert_eq!(dir.names(), ["clip.gif", "clip.json"]);
}

/// RIFF chunks of a WebP file as (fourcc, payload).
fn riff_chunks(webp: &[u8]) -> Vec<(String, &[u8])> {
    assert_eq!(&webp[0..4], b"RIFF");
    assert_eq!(
        u32::from_le_bytes(webp[4..8].try_into().unwrap()) as usize,
        webp.len() - 8,
        "RIFF size"
    );
    assert_eq!(&webp[8..12], b"WEBP");
    let mut chunks = Vec::new();
    let mut at = 12;
    while at < webp.len() {
        let len = u32::from_le_bytes(webp[at + 4..at + 8].try_into().unwrap()) as usize;
        chunks.push((
            String::from_utf8_lossy(&webp[at..at + 4]).into_owned(),
            &webp[at + 8..at + 8 + len],
        ));
        at += 8 + len + len % 2;
    }
    assert_eq!(at, webp.len(), "chunks tile the file");
    chunks
}

fn check_webp(frames: usize) {
    let dir = TestDir::new("webp");
    let path = dir.join("clip.webp");
    let clip = synthetic_clip(64, 48, frames, 7.5);
    write_clip(&path, &clip, &recipe()).expect("write WebP");

    let bytes = std::fs::read(&path).expect("read WebP");
    let chunks = riff_chunks(&bytes);
    let (first, vp8x) = &chunks[0];
    assert_eq!(first, "VP8X");
    assert_ne!(vp8x[0] & 0x04, 0, "VP8X announces the XMP chunk");
    assert_eq!(chunks.last().map(|c| c.0.as_str()), Some("XMP "));

    let decoder = webp_animation::Decoder::new(&bytes).expect("libwebp accepts the file");
    assert_eq!(decoder.dimensions(), (clip.width, clip.height));
    let decoded: Vec<_> = decoder.into_iter().collect();
    assert_eq!(decoded.len(), clip.frames.len());
    for (index, frame) in decoded.iter().enumerate() {
        let error = mean_abs_error(&rgba_to_rgb(frame.data()), &clip.frames[index]);
        assert!(
            error < MAX_LOSSY_ERROR,
            "frame {index}: mean abs error {error:.2}/255"
        );
    }
    if frames > 1 {
        // libwebp reports when each frame ends; a still image has no timing.
        for (index, frame) in decoded.iter().enumerate() {
            let end_ms = ((index + 1) as f64 * 1000.0 / clip.fps as f64).round() as i32;
            assert_eq!(frame.timestamp(), end_ms, "frame {index} end time");
        }
        let anim = chunks.iter().find(|c| c.0 == "ANIM").expect("ANIM chunk").1;
        assert_eq!(
            u16::from_le_bytes([anim[4], anim[5]]),
            0,
            "loop count 0 = forever"
        );
    }

    assert_eq!(read_recipe(&path).expect("recipe from WebP"), recipe());
    assert_eq!(
        read_recipe(&sidecar_path(&path)).expect("recipe from sidecar"),
        recipe()
    );
    assert_eq!(dir.names(), ["clip.json", "clip.webp"]);
}

#[test]
fn webp_decodes_with_timing_loop_and_xmp() {
    check_webp(4);
}

#[test]
fn webp_of_one_frame_still_carries_the_recipe() {
    // libwebp writes a single frame as a still image, which needs a VP8X header added.
    check_webp(1);
}

#[test]
fn png_folder_holds_exact_frames_and_recipe() {
    let dir = TestDir::new("png");
    let path = dir.join("clip");
    let clip = synthetic_clip(64, 48, 4, 8.0);
    write_clip(&path, &clip, &recipe()).expect("write PNG folder");

    let mut expected: Vec<String> = (0..clip.frames.len())
        .map(|i| format!("frame_{i:04}.png"))
        .collect();
    expected.push("recipe.json".to_string());
    assert_eq!(common::list(&path), expected);
    for (index, original) in clip.frames.iter().enumerate() {
        let file =
            std::fs::File::open(path.join(format!("frame_{index:04}.png"))).expect("open frame");
        let mut reader = png::Decoder::new(std::io::BufReader::new(file))
            .read_info()
            .expect("PNG header");
        let recipe_chunk = reader
            .info()
            .utf8_text
            .iter()
            .find(|c| c.keyword == "motif-recipe")
            .expect("iTXt");
        assert_eq!(
            recipe_chunk.get_text().expect("iTXt text"),
            recipe(),
            "frame {index} carries the recipe"
        );
        let mut pixels = vec![0; reader.output_buffer_size().expect("size")];
        let info = reader.next_frame(&mut pixels).expect("PNG pixels");
        assert_eq!(
            (info.width, info.height, info.color_type),
            (clip.width, clip.height, png::ColorType::Rgb)
        );
        assert!(pixels == *original, "frame {index} pixels differ");
    }

    assert_eq!(
        read_recipe(&path).expect("recipe from PNG folder"),
        recipe()
    );
    assert_eq!(sidecar_path(&path), path.join("recipe.json"));
    assert_eq!(
        read_recipe(&sidecar_path(&path)).expect("recipe from sidecar"),
        recipe()
    );
    assert_eq!(dir.names(), ["clip"]);
}

#[test]
fn png_folder_path_may_end_in_a_slash() {
    let dir = TestDir::new("png-slash");
    let path = dir.0.join("clip/");
    write_clip(&path, &synthetic_clip(64, 48, 2, 8.0), &recipe()).expect("write PNG folder");
    assert_eq!(
        read_recipe(&path).expect("recipe from PNG folder"),
        recipe()
    );
    assert_eq!(
        common::list(&dir.join("clip")),
        ["frame_0000.png", "frame_0001.png", "recipe.json"]
    );
    assert_eq!(dir.names(), ["clip"]);
}

#[test]
fn formats_and_sidecars_follow_the_path() {
    let cases = [
        ("out/clip.mp4", Format::Mp4, "out/clip.json"),
        ("out/clip.GIF", Format::Gif, "out/clip.json"),
        ("clip.webp", Format::Webp, "clip.json"),
        ("out/clip", Format::PngDir, "out/clip/recipe.json"),
        ("out/clip.v2/", Format::PngDir, "out/clip.v2/recipe.json"),
    ];
    for (path, format, sidecar) in cases {
        assert_eq!(format_for(Path::new(path)).expect(path), format, "{path}");
        assert_eq!(sidecar_path(Path::new(path)), Path::new(sidecar), "{path}");
    }
    for path in ["out/clip.avi", "clip.json", "clip.v2", ""] {
        let error = format_for(Path::new(path)).expect_err(path).to_string();
        assert!(error.contains(path) && error.contains(".mp4"), "{error}");
    }
}

#[test]
fn writing_again_replaces_the_clip() {
    let dir = TestDir::new("replace");
    let first = synthetic_clip(64, 48, 4, 8.0);
    let second = Clip {
        frames: first.frames[..2].to_vec(),
        ..first.clone()
    };
    for name in ["clip.gif", "clip"] {
        let path = dir.join(name);
        write_clip(&path, &first, "{\"take\":1}").expect("first write");
        write_clip(&path, &second, "{\"take\":2}").expect("second write");
        assert_eq!(read_recipe(&path).expect("recipe"), "{\"take\":2}");
        assert_eq!(
            read_recipe(&sidecar_path(&path)).expect("sidecar"),
            "{\"take\":2}"
        );
    }
    assert_eq!(
        common::list(&dir.join("clip")),
        ["frame_0000.png", "frame_0001.png", "recipe.json"],
        "old frames gone"
    );
    assert_eq!(dir.names(), ["clip", "clip.gif", "clip.json"]);
}
