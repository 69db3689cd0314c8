//! `shrink_mp4` on clips written by `write_clip`: the result fits the limit, still plays with
//! the same frame count and rate (ffprobe when installed, the MP4's own tables always) and
//! still carries the recipe; impossible limits, clips that already fit and bad input.

mod common;

use std::path::Path;
use std::process::Command;

use common::{recipe, TestDir};
use motif_video::{read_recipe, shrink_mp4, write_clip, Clip, VideoError};
use shiguredo_mp4::boxes::SampleEntry;
use shiguredo_mp4::demux::{Input, Mp4FileDemuxer};

/// A gradient with per-pixel noise that changes every frame, so that H.264 at the writer's
/// fine quantiser spends many bytes on it and coarser settings spend far fewer.
fn noisy_clip(width: u32, height: u32, frames: usize, fps: f32) -> Clip {
    let mut state = 0x2545_f491_u32;
    let mut noise = move || {
        // xorshift32: deterministic, so the file sizes below do not vary between runs.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state % 64) as i32 - 32
    };
    let (w, h) = (width as usize, height as usize);
    let frames = (0..frames)
        .map(|k| {
            let mut rgb = Vec::with_capacity(w * h * 3);
            for y in 0..h {
                for x in 0..w {
                    let base = [x * 255 / w, y * 255 / h, (x + y + 8 * k) * 255 / (w + h)];
                    for channel in base {
                        rgb.push((channel as i32 + noise()).clamp(0, 255) as u8);
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

/// What the MP4's own tables say about its video track.
#[derive(Debug, PartialEq)]
struct TrackSummary {
    width: u16,
    height: u16,
    frames: usize,
    fps: f64,
}

fn track_summary(mp4: &[u8]) -> TrackSummary {
    let mut demuxer = Mp4FileDemuxer::new();
    demuxer.handle_input(Input {
        position: 0,
        data: mp4,
    });
    let tracks = demuxer.tracks().expect("tracks").to_vec();
    assert_eq!(tracks.len(), 1, "one track: {tracks:?}");
    let mut size = None;
    let mut frames = 0;
    let mut ticks = 0;
    while let Some(sample) = demuxer.next_sample().expect("sample") {
        if let Some(SampleEntry::Avc1(avc1)) = sample.sample_entry {
            size = Some((avc1.visual.width, avc1.visual.height));
        }
        frames += 1;
        ticks += sample.duration as u64;
    }
    let (width, height) = size.expect("an avc1 sample entry");
    TrackSummary {
        width,
        height,
        frames,
        fps: frames as f64 * tracks[0].timescale.get() as f64 / ticks as f64,
    }
}

fn ffprobe_is_installed() -> bool {
    Command::new("ffprobe").arg("-version").output().is_ok()
}

/// ffprobe decodes every frame of the MP4 at `path` and finds `expected` and the recipe.
fn check_with_ffprobe(path: &Path, expected: &TrackSummary) {
    if !ffprobe_is_installed() {
        println!("ffprobe is not on PATH: skipping the independent decode of {path:?}");
        return;
    }
    let probe = common::ffprobe(path);
    let stream = &probe["streams"][0];
    assert_eq!(stream["codec_name"], "h264", "{probe}");
    assert_eq!(stream["pix_fmt"], "yuv420p", "{probe}");
    assert_eq!(stream["width"], expected.width, "{probe}");
    assert_eq!(stream["height"], expected.height, "{probe}");
    assert_eq!(
        stream["nb_read_frames"],
        expected.frames.to_string(),
        "frames the decoder returned"
    );
    let rate = stream["avg_frame_rate"].as_str().expect("frame rate");
    let (num, den) = rate.split_once('/').expect("frame rate is a fraction");
    let rate = num.parse::<f64>().expect("numerator") / den.parse::<f64>().expect("denominator");
    assert!((rate - expected.fps).abs() < 1e-6, "avg_frame_rate {rate}");
    assert_eq!(probe["format"]["tags"]["comment"], recipe());
}

/// Writes `clip`, shrinks it to `max_bytes` and checks the result; returns its track.
fn shrink_and_check(dir: &TestDir, clip: &Clip, max_bytes: usize) -> TrackSummary {
    let original_path = dir.join("original.mp4");
    write_clip(&original_path, clip, &recipe()).expect("write MP4");
    let original = std::fs::read(&original_path).expect("read MP4");
    assert!(
        original.len() > max_bytes,
        "the test needs a clip over the limit: {} bytes, limit {max_bytes}",
        original.len()
    );

    let shrunk = shrink_mp4(&original, max_bytes)
        .expect("shrink")
        .expect("an attempt fits");
    assert!(
        shrunk.len() <= max_bytes,
        "{} bytes, limit {max_bytes}",
        shrunk.len()
    );

    let before = track_summary(&original);
    let after = track_summary(&shrunk);
    assert_eq!(after.frames, before.frames, "frame count");
    assert_eq!(after.fps, before.fps, "frame rate");
    let full = (before.width, before.height);
    let half = ((before.width / 2) & !1, (before.height / 2) & !1);
    assert!(
        (after.width, after.height) == full || (after.width, after.height) == half,
        "{}x{} from {}x{}",
        after.width,
        after.height,
        before.width,
        before.height
    );

    let shrunk_path = dir.join("shrunk.mp4");
    std::fs::write(&shrunk_path, &shrunk).expect("write shrunk MP4");
    assert_eq!(read_recipe(&shrunk_path).expect("recipe"), recipe());
    check_with_ffprobe(&shrunk_path, &after);
    after
}

#[test]
fn shrinks_below_the_limit_at_full_size_first() {
    let dir = TestDir::new("shrink-full");
    for (clip, expected_fps) in [
        (noisy_clip(64, 64, 10, 8.0), 8.0),
        (noisy_clip(96, 64, 10, 7.5), 7.5),
    ] {
        let original_path = dir.join("measure.mp4");
        write_clip(&original_path, &clip, &recipe()).expect("write MP4");
        let original_len = std::fs::metadata(&original_path).expect("stat").len() as usize;
        // Two thirds of the writer's size: QP 28 noise takes well under half.
        let after = shrink_and_check(&dir, &clip, original_len * 2 / 3);
        assert_eq!(
            (after.width as u32, after.height as u32),
            (clip.width, clip.height)
        );
        assert_eq!(after.fps, expected_fps);
    }
}

#[test]
fn a_tight_limit_falls_back_to_half_size() {
    let dir = TestDir::new("shrink-half");
    for clip in [noisy_clip(64, 64, 10, 8.0), noisy_clip(96, 64, 10, 7.5)] {
        // Each pass asks for less than the last result took, so it moves at least one step
        // down the ladder; the limit ends just below the smallest full-size result.
        let original_path = dir.join("measure.mp4");
        write_clip(&original_path, &clip, &recipe()).expect("write MP4");
        let original = std::fs::read(&original_path).expect("read MP4");
        let mut limit = original.len() - 1;
        let mut full_size_steps = 0;
        loop {
            let shrunk = shrink_mp4(&original, limit)
                .expect("shrink")
                .expect("half size at QP 40 fits");
            assert!(
                shrunk.len() <= limit,
                "{} bytes, limit {limit}",
                shrunk.len()
            );
            let summary = track_summary(&shrunk);
            if (summary.width as u32, summary.height as u32) != (clip.width, clip.height) {
                break;
            }
            full_size_steps += 1;
            assert!(full_size_steps <= 2, "the ladder has two full-size steps");
            limit = shrunk.len() - 1;
        }
        assert!(
            full_size_steps >= 1,
            "QP 28 at full size beats the writer's QP 18"
        );
        let after = shrink_and_check(&dir, &clip, limit);
        assert_eq!(
            (after.width as u32, after.height as u32),
            (clip.width / 2, clip.height / 2)
        );
    }
}

#[test]
fn a_limit_nothing_reaches_gives_none() {
    let clip = noisy_clip(64, 64, 6, 8.0);
    let dir = TestDir::new("shrink-none");
    let path = dir.join("clip.mp4");
    write_clip(&path, &clip, &recipe()).expect("write MP4");
    let original = std::fs::read(&path).expect("read MP4");
    // The recipe alone takes more than this.
    assert_eq!(shrink_mp4(&original, 200).expect("valid clip"), None);
    assert_eq!(shrink_mp4(&original, 0).expect("valid clip"), None);
}

#[test]
fn a_clip_that_fits_comes_back_unchanged() {
    let clip = noisy_clip(64, 64, 6, 8.0);
    let dir = TestDir::new("shrink-fits");
    let path = dir.join("clip.mp4");
    write_clip(&path, &clip, &recipe()).expect("write MP4");
    let original = std::fs::read(&path).expect("read MP4");
    for limit in [original.len(), 10 << 20] {
        assert_eq!(
            shrink_mp4(&original, limit).expect("valid clip").as_deref(),
            Some(&original[..])
        );
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let dir = TestDir::new("shrink-bad");
    let path = dir.join("clip.mp4");
    write_clip(&path, &noisy_clip(32, 32, 4, 8.0), &recipe()).expect("write MP4");
    let original = std::fs::read(&path).expect("read MP4");

    for garbage in [
        &b""[..],
        b"not an mp4 at all",
        b"\x00\x00\x00\x08ftyp",
        b"\x00\x00\x00\x10ftypisom\x00\x00\x00\x00\xff\xff\xff\xffmoov",
    ] {
        let error = shrink_mp4(garbage, 0).expect_err("garbage");
        assert!(matches!(error, VideoError::NotMp4 { .. }), "{error}");
    }

    // Every truncation loses either a box the demuxer needs or the end of the last sample.
    for len in (0..original.len()).step_by(7) {
        let error = shrink_mp4(&original[..len], 1 << 20).expect_err("truncated");
        assert!(
            matches!(error, VideoError::NotMp4 { .. }),
            "cut to {len} bytes: {error}"
        );
    }

    // Another codec's sample entry (the first "avc1" after "stsd"; ftyp names avc1 as a brand).
    let stsd = original
        .windows(4)
        .position(|w| w == b"stsd")
        .expect("an stsd box");
    let at = stsd
        + original[stsd..]
            .windows(4)
            .position(|w| w == b"avc1")
            .expect("an avc1 sample entry");
    let mut other_codec = original.clone();
    other_codec[at..at + 4].copy_from_slice(b"xyz1");
    let error = shrink_mp4(&other_codec, 0).expect_err("not H.264");
    assert!(
        matches!(&error, VideoError::NotH264 { found } if found == "xyz1"),
        "{error}"
    );

    // Damaged bytes anywhere: whatever comes back, it must come back. Half the size keeps
    // every attempt decoding to the end.
    let mut state = 0x9e37_79b9_u32;
    for _ in 0..300 {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let at = state as usize % original.len();
        let mut damaged = original.clone();
        damaged[at] ^= (state >> 24) as u8 | 1;
        let _ = shrink_mp4(&damaged, original.len() / 2);
    }
}
