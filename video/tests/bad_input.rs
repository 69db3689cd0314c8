//! Bad clips, bad paths and failed writes: each returns an error that names the file, and
//! leaves nothing at the path, no sidecar and no temporary file.

mod common;

use common::{recipe, synthetic_clip, TestDir};
use motif_video::{read_recipe, write_clip, Clip, VideoError};

const ALL_FORMATS: [&str; 4] = ["clip.mp4", "clip.gif", "clip.webp", "clip"];

/// Writes `clip` to `name` in a fresh folder, expects an error naming the file, and checks
/// the folder is still empty.
fn expect_rejected(name: &str, clip: &Clip) -> VideoError {
    let dir = TestDir::new("bad");
    let path = dir.join(name);
    let error = write_clip(&path, clip, &recipe()).expect_err("bad input must be rejected");
    assert!(
        error.to_string().contains(name),
        "error does not name {name}: {error}"
    );
    assert!(
        dir.names().is_empty(),
        "{name}: left {:?} behind after: {error}",
        dir.names()
    );
    error
}

#[test]
fn odd_size_is_rejected_for_mp4_only() {
    let odd_width = synthetic_clip(63, 48, 2, 8.0);
    let error = expect_rejected("clip.mp4", &odd_width);
    assert!(error.to_string().contains("width 63 is odd"), "{error}");
    let odd_height = synthetic_clip(64, 47, 2, 8.0);
    assert!(expect_rejected("clip.mp4", &odd_height)
        .to_string()
        .contains("height 47 is odd"));

    let dir = TestDir::new("odd-ok");
    for name in ["clip.gif", "clip.webp", "clip"] {
        write_clip(&dir.join(name), &odd_width, &recipe())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn wrong_frame_length_is_rejected() {
    for name in ALL_FORMATS {
        let mut clip = synthetic_clip(64, 48, 3, 8.0);
        clip.frames[1].pop();
        let error = expect_rejected(name, &clip);
        assert!(
            matches!(error, VideoError::FrameLength { index: 1, .. }),
            "{error}"
        );
    }
}

#[test]
fn empty_clips_are_rejected() {
    for name in ALL_FORMATS {
        let mut no_frames = synthetic_clip(64, 48, 1, 8.0);
        no_frames.frames.clear();
        assert!(matches!(
            expect_rejected(name, &no_frames),
            VideoError::NoFrames { .. }
        ));
        let zero_size = Clip {
            width: 0,
            height: 48,
            fps: 8.0,
            frames: vec![Vec::new()],
        };
        assert!(matches!(
            expect_rejected(name, &zero_size),
            VideoError::EmptyFrame { .. }
        ));
    }
}

#[test]
fn bad_fps_is_rejected() {
    for name in ALL_FORMATS {
        for fps in [0.0, -8.0, f32::NAN, f32::INFINITY] {
            let clip = synthetic_clip(64, 48, 2, fps);
            assert!(
                matches!(expect_rejected(name, &clip), VideoError::Fps { .. }),
                "{name} at {fps} fps"
            );
        }
    }
    // A GIF cannot show 60 fps: delays are whole centiseconds and browsers slow down 1 cs.
    assert!(matches!(
        expect_rejected("clip.gif", &synthetic_clip(64, 48, 2, 60.0)),
        VideoError::Fps { .. }
    ));
}

#[test]
fn unknown_extension_is_rejected() {
    let error = expect_rejected("clip.avi", &synthetic_clip(64, 48, 2, 8.0));
    assert!(matches!(error, VideoError::UnknownFormat { .. }), "{error}");
    assert!(
        error.to_string().contains(".mp4"),
        "error lists the accepted extensions: {error}"
    );
}

#[test]
fn unwritable_destination_leaves_nothing() {
    let dir = TestDir::new("unwritable");
    // A regular file where the parent folder should be: no user, root included, can write there.
    std::fs::write(dir.join("not-a-folder"), b"x").expect("write blocker");
    let clip = synthetic_clip(64, 48, 2, 8.0);
    for name in ALL_FORMATS {
        for parent in ["not-a-folder", "missing-folder"] {
            let path = dir.join(parent).join(name);
            let error = write_clip(&path, &clip, &recipe()).expect_err("unwritable destination");
            assert!(matches!(error, VideoError::Io { .. }), "{error}");
            assert!(error.to_string().contains(name), "{error}");
            assert_eq!(dir.names(), ["not-a-folder"], "{name} in {parent}: {error}");
        }
    }
}

#[test]
fn failed_sidecar_takes_the_clip_back_out() {
    let dir = TestDir::new("sidecar-blocked");
    // A folder where the sidecar goes: the clip is renamed into place, then the sidecar's
    // rename fails.
    std::fs::create_dir(dir.join("clip.json")).expect("create blocker");
    std::fs::write(dir.join("clip.json").join("keep"), b"x").expect("fill blocker");
    for name in ["clip.mp4", "clip.gif", "clip.webp"] {
        let error = write_clip(&dir.join(name), &synthetic_clip(64, 48, 2, 8.0), &recipe())
            .expect_err(name);
        assert!(matches!(error, VideoError::Io { .. }), "{error}");
        assert_eq!(dir.names(), ["clip.json"], "{name}: {error}");
    }
}

#[test]
fn failed_write_keeps_the_previous_clip() {
    let dir = TestDir::new("keep-previous");
    let good = synthetic_clip(64, 48, 2, 8.0);
    let mut bad = good.clone();
    bad.frames[0].clear();
    for name in ["clip.gif", "clip"] {
        let path = dir.join(name);
        write_clip(&path, &good, "{\"take\":1}").expect("first write");
        write_clip(&path, &bad, "{\"take\":2}").expect_err("bad clip");
        assert_eq!(read_recipe(&path).expect("previous recipe"), "{\"take\":1}");
    }
    assert_eq!(dir.names(), ["clip", "clip.gif", "clip.json"]);
}

#[test]
fn a_folder_motif_did_not_write_is_not_replaced() {
    let dir = TestDir::new("foreign");
    let path = dir.join("photos");
    std::fs::create_dir(&path).expect("create folder");
    std::fs::write(path.join("holiday.jpg"), b"not ours").expect("write file");
    let error =
        write_clip(&path, &synthetic_clip(64, 48, 2, 8.0), &recipe()).expect_err("foreign folder");
    assert!(matches!(error, VideoError::NotOurFolder { .. }), "{error}");
    assert_eq!(common::list(&path), ["holiday.jpg"]);
    assert_eq!(dir.names(), ["photos"]);
}

#[test]
fn read_recipe_reports_missing_and_malformed_metadata() {
    let dir = TestDir::new("read");
    // A valid GIF without a comment.
    let plain_gif = dir.join("plain.gif");
    {
        let file = std::fs::File::create(&plain_gif).expect("create GIF");
        let mut encoder =
            gif::Encoder::new(file, 2, 2, &[0, 0, 0, 255, 255, 255]).expect("GIF encoder");
        let frame = gif::Frame {
            width: 2,
            height: 2,
            buffer: vec![0, 1, 1, 0].into(),
            ..gif::Frame::default()
        };
        encoder.write_frame(&frame).expect("GIF frame");
    }
    assert!(matches!(
        read_recipe(&plain_gif),
        Err(VideoError::NoRecipe { .. })
    ));

    for name in ["junk.mp4", "junk.gif", "junk.webp"] {
        std::fs::write(dir.join(name), b"\x00\x00\x00\x03 definitely not a video")
            .expect("write junk");
        let error = read_recipe(&dir.join(name)).expect_err(name);
        assert!(
            matches!(
                error,
                VideoError::Malformed { .. } | VideoError::NoRecipe { .. }
            ),
            "{error}"
        );
        assert!(error.to_string().contains(name), "{error}");
    }
    assert!(matches!(
        read_recipe(&dir.join("missing.mp4")),
        Err(VideoError::Io { .. })
    ));
    assert!(matches!(
        read_recipe(&dir.join("clip.avi")),
        Err(VideoError::UnknownFormat { .. })
    ));
}
