//! H.264 in MP4. OpenH264 (compiled from the crate's bundled source) encodes constrained
//! baseline 4:2:0, which every browser plays; shiguredo_mp4 builds the sample tables and puts
//! the `moov` before the media data (faststart) so playback starts before the file is read
//! to the end. The recipe rides in `moov/udta/meta/ilst/©cmt`, the iTunes-style comment that
//! ffprobe and most players show as `comment`.

use std::num::NonZeroU32;
use std::path::Path;

use openh264::encoder::{
    Encoder, EncoderConfig, FrameRate, FrameType, IntraFramePeriod, QpRange, RateControlMode,
    VuiConfig,
};
use openh264::formats::YUVSlices;
use openh264::{OpenH264API, Timestamp};
use shiguredo_mp4::bitstream::h264::{
    build_avc1_box, parse_annexb_nal_units, H264NalUnitType, H264SampleEntryConfig, LengthSize,
};
use shiguredo_mp4::boxes::{SampleEntry, UnknownBox};
use shiguredo_mp4::mux::{
    estimate_maximum_moov_box_size, Mp4FileMuxer, Mp4FileMuxerOptions, Sample,
};
use shiguredo_mp4::{BoxSize, BoxType, Encode, TrackKind};

use crate::{frame_start, Clip, VideoError};

/// Each sample lasts this many ticks and the timescale is `fps * TICKS_PER_FRAME`, which is
/// exact for every fps with up to three decimals (7.5 fps -> 7500 ticks/s, ffprobe `15/2`).
const TICKS_PER_FRAME: NonZeroU32 = NonZeroU32::new(1000).unwrap();
/// OpenH264's largest frame, either way round.
const MAX_LONG_SIDE: u32 = 3840;
const MAX_SHORT_SIDE: u32 = 2160;
/// Constant quantiser, near the usual "visually lossless" H.264 setting: clips are a few
/// seconds long, so size matters less than not smearing generated detail.
const WRITE_QP: u8 = 18;
/// An IDR frame every 2 seconds lets players seek without decoding from the start.
const KEYFRAME_SECONDS: f32 = 2.0;

/// Boxes from the top of the file down to the recipe's text.
const RECIPE_BOX_PATH: [&[u8; 4]; 6] = [b"moov", b"udta", b"meta", b"ilst", b"\xa9cmt", b"data"];
/// iTunes metadata `data` type for UTF-8 text.
const DATA_TYPE_UTF8: u32 = 1;

pub(crate) fn encode(path: &Path, clip: &Clip, recipe: &str) -> Result<Vec<u8>, VideoError> {
    let timescale = validate(path, clip)?;
    let encode_error = |message| VideoError::Encode {
        path: path.to_path_buf(),
        codec: "H.264",
        message,
    };
    let (width, height) = (clip.width as usize, clip.height as usize);
    let mut encoder = H264Encoder::new(width, height, clip.fps, WRITE_QP).map_err(encode_error)?;
    let mut frames = Vec::with_capacity(clip.frames.len());
    for rgb in &clip.frames {
        let frame = encoder
            .encode(&rgb_to_i420(rgb, width, height))
            .map_err(encode_error)?;
        frames.push(frame);
    }
    let timing = FrameTiming {
        timescale,
        ticks_per_frame: TICKS_PER_FRAME,
    };
    mux(&frames, timing, Some(recipe.as_bytes())).map_err(|message| VideoError::Encode {
        path: path.to_path_buf(),
        codec: "MP4",
        message,
    })
}

/// A 4:2:0 picture as three tightly packed planes (no row padding): `width * height` luma
/// samples, then `width / 2 * height / 2` samples each of Cb and Cr. Width and height are even.
pub(crate) struct I420 {
    pub(crate) luma: Vec<u8>,
    pub(crate) cb: Vec<u8>,
    pub(crate) cr: Vec<u8>,
}

/// A constant frame rate as MP4 stores it: `timescale` ticks per second, every sample
/// `ticks_per_frame` ticks long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameTiming {
    pub(crate) timescale: NonZeroU32,
    pub(crate) ticks_per_frame: NonZeroU32,
}

impl FrameTiming {
    pub(crate) fn fps(self) -> f32 {
        (self.timescale.get() as f64 / self.ticks_per_frame.get() as f64) as f32
    }
}

/// One encoded frame: its parameter sets, and the rest as an MP4 sample (NAL units each
/// prefixed with a 4-byte big-endian length instead of an Annex B start code).
pub(crate) struct EncodedFrame {
    sps: Vec<Vec<u8>>,
    pps: Vec<Vec<u8>>,
    pub(crate) sample: Vec<u8>,
    is_idr: bool,
}

/// OpenH264 at a constant quantiser, fed one [`I420`] picture at a time.
pub(crate) struct H264Encoder {
    encoder: Encoder,
    width: usize,
    height: usize,
    fps: f32,
    next_index: usize,
}

impl H264Encoder {
    /// `qp` is the constant quantiser, 0 (best) to 51 (smallest).
    pub(crate) fn new(width: usize, height: usize, fps: f32, qp: u8) -> Result<Self, String> {
        // Constant QP: buffer-based rate control with the QP range pinned to one value. The
        // quality and bitrate modes want to skip frames to meet a bitrate (OpenH264 warns when
        // skipping is off, and drops frames when it is on), and RC off ignores the QP range.
        let keyframe_interval = (fps * KEYFRAME_SECONDS).round().max(1.0) as u32;
        let config = EncoderConfig::new()
            .skip_frames(false)
            .rate_control_mode(RateControlMode::Bufferbased)
            .qp(QpRange::new(qp, qp))
            .max_frame_rate(FrameRate::from_hz(fps))
            .intra_frame_period(IntraFramePeriod::from_num_frames(keyframe_interval))
            // The matrix and range rgb_to_i420 uses, so players convert back the same way.
            .vui(VuiConfig::bt601());
        let encoder = Encoder::with_api_config(OpenH264API::from_source(), config)
            .map_err(|e| e.to_string())?;
        Ok(H264Encoder {
            encoder,
            width,
            height,
            fps,
            next_index: 0,
        })
    }

    pub(crate) fn encode(&mut self, frame: &I420) -> Result<EncodedFrame, String> {
        let (width, height) = (self.width, self.height);
        let yuv = YUVSlices::new(
            (&frame.luma, &frame.cb, &frame.cr),
            (width, height),
            (width, width / 2, width / 2),
        );
        let index = self.next_index;
        self.next_index += 1;
        let start_ms = frame_start(index, self.fps, 1000.0) as u64;
        let bitstream = self
            .encoder
            .encode_at(&yuv, Timestamp::from_millis(start_ms))
            .map_err(|e| e.to_string())?;
        let frame_type = bitstream.frame_type();
        if frame_type == FrameType::Skip || frame_type == FrameType::Invalid {
            return Err(format!("frame {index} came back as {frame_type:?}"));
        }
        split_parameter_sets(&bitstream.to_vec()).map_err(|e| e.to_string())
    }
}

fn split_parameter_sets(annexb: &[u8]) -> Result<EncodedFrame, shiguredo_mp4::Error> {
    let mut frame = EncodedFrame {
        sps: Vec::new(),
        pps: Vec::new(),
        sample: Vec::new(),
        is_idr: false,
    };
    for nal in parse_annexb_nal_units(annexb)? {
        match nal.nal_unit_type {
            H264NalUnitType::Sps => frame.sps.push(nal.data.to_vec()),
            H264NalUnitType::Pps => frame.pps.push(nal.data.to_vec()),
            kind => {
                frame.is_idr |= kind == H264NalUnitType::IdrSlice;
                let len = u32::try_from(nal.data.len())
                    .expect("an H.264 NAL unit of a <=4K frame is far below 4 GiB");
                frame.sample.extend_from_slice(&len.to_be_bytes());
                frame.sample.extend_from_slice(nal.data);
            }
        }
    }
    Ok(frame)
}

/// Lays the frames out as `ftyp`, `moov` (with the recipe, if any), `mdat`.
pub(crate) fn mux(
    frames: &[EncodedFrame],
    timing: FrameTiming,
    recipe: Option<&[u8]>,
) -> Result<Vec<u8>, String> {
    let first = frames.first().ok_or("no frames to mux")?;
    // OpenH264 repeats the same SPS/PPS before every IDR frame (its default ConstantId
    // strategy): the first copy goes into the avc1 sample entry, the repeats are dropped.
    let avc1 = build_avc1_box(
        &first.sps,
        &first.pps,
        &H264SampleEntryConfig {
            length_size: LengthSize::FourBytes,
        },
    )
    .map_err(|e| e.to_string())?;

    let udta = recipe.map(recipe_udta);
    let mut muxer = Mp4FileMuxer::with_options(Mp4FileMuxerOptions {
        // Room for the muxer's moov plus our udta (payload and its 8-byte header).
        reserved_moov_box_size: estimate_maximum_moov_box_size(&[frames.len()])
            + udta.as_ref().map_or(0, |udta| udta.payload.len() + 8),
        ..Mp4FileMuxerOptions::default()
    })
    .map_err(|e| e.to_string())?;
    let mut mp4 = muxer.initial_boxes_bytes().to_vec();
    let mut sample_entry = Some(SampleEntry::Avc1(avc1));
    for frame in frames {
        let sample = Sample {
            track_kind: TrackKind::Video,
            // Needed on the first sample only; later ones reuse it.
            sample_entry: sample_entry.take(),
            keyframe: frame.is_idr,
            timescale: timing.timescale,
            duration: timing.ticks_per_frame.get(),
            composition_time_offset: None,
            data_offset: mp4.len() as u64,
            data_size: frame.sample.len(),
        };
        mp4.extend_from_slice(&frame.sample);
        muxer.append_sample(&sample).map_err(|e| e.to_string())?;
    }

    let finalized = muxer.finalize().map_err(|e| e.to_string())?;
    for (offset, bytes) in finalized.offset_and_bytes_pairs() {
        let offset = offset as usize;
        if mp4.len() < offset + bytes.len() {
            mp4.resize(offset + bytes.len(), 0);
        }
        mp4[offset..offset + bytes.len()].copy_from_slice(bytes);
    }
    let Some(udta) = udta else {
        return Ok(mp4);
    };
    // The muxer's moov cannot carry a udta, so ours (the same boxes plus the recipe)
    // replaces it.
    let mut moov = finalized.moov_box().clone();
    moov.unknown_boxes.push(udta);
    let moov = moov.encode_to_vec().map_err(|e| e.to_string())?;
    replace_moov(&mut mp4, &moov).ok_or("the muxer's output has no top-level moov box")?;
    Ok(mp4)
}

/// Checks what H.264 and the MP4 timescale need; returns the timescale.
fn validate(path: &Path, clip: &Clip) -> Result<NonZeroU32, VideoError> {
    for (side, value) in [("width", clip.width), ("height", clip.height)] {
        if value % 2 == 1 {
            return Err(VideoError::OddSize {
                path: path.to_path_buf(),
                side,
                value,
            });
        }
    }
    let (long, short) = (clip.width.max(clip.height), clip.width.min(clip.height));
    if long > MAX_LONG_SIDE || short > MAX_SHORT_SIDE {
        return Err(VideoError::TooLarge {
            path: path.to_path_buf(),
            width: clip.width,
            height: clip.height,
            expected: "at most 3840x2160 or 2160x3840 for H.264 (OpenH264's limit)",
        });
    }
    let ticks = (clip.fps as f64 * TICKS_PER_FRAME.get() as f64).round();
    match NonZeroU32::new(ticks.min(u32::MAX as f64) as u32) {
        Some(timescale) if ticks <= u32::MAX as f64 => Ok(timescale),
        _ => Err(VideoError::Fps {
            path: path.to_path_buf(),
            fps: clip.fps,
            expected:
                "between 0.0005 and 4294967 for MP4 (the timescale is fps * 1000 ticks per second)",
        }),
    }
}

/// RGB8 to 4:2:0 YCbCr, BT.601 limited range (ITU-R BT.601 section 2.5.3: Y in 16..=235,
/// Cb/Cr in 16..=240), rounded to nearest; each chroma sample comes from the average of a
/// 2x2 block.
fn rgb_to_i420(rgb: &[u8], width: usize, height: usize) -> I420 {
    let pixel = |x: usize, y: usize| {
        let at = (y * width + x) * 3;
        [rgb[at] as f32, rgb[at + 1] as f32, rgb[at + 2] as f32]
    };
    let to_u8 = |value: f32| (value + 0.5) as u8;
    let mut luma = Vec::with_capacity(width * height);
    for y in 0..height {
        for x in 0..width {
            let [r, g, b] = pixel(x, y);
            luma.push(to_u8(
                16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0,
            ));
        }
    }
    let mut cb = Vec::with_capacity(width * height / 4);
    let mut cr = Vec::with_capacity(width * height / 4);
    for y in (0..height).step_by(2) {
        for x in (0..width).step_by(2) {
            let block = [
                pixel(x, y),
                pixel(x + 1, y),
                pixel(x, y + 1),
                pixel(x + 1, y + 1),
            ];
            let [r, g, b] = [0, 1, 2].map(|c| block.iter().map(|p| p[c]).sum::<f32>() / 4.0);
            cb.push(to_u8(
                128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0,
            ));
            cr.push(to_u8(128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0));
        }
    }
    I420 { luma, cb, cr }
}

/// `udta/meta/ilst/©cmt/data` holding the recipe.
fn recipe_udta(recipe: &[u8]) -> UnknownBox {
    // data: type (UTF-8 text), locale (0: any), then the text.
    let text = [&DATA_TYPE_UTF8.to_be_bytes()[..], &[0; 4], recipe].concat();
    let data = mp4_box(b"data", &text);
    let ilst = mp4_box(b"ilst", &mp4_box(b"\xa9cmt", &data));
    // Handler 'mdir' marks iTunes-style metadata; version/flags, pre_defined, handler type,
    // three reserved words ('appl' by iTunes convention), empty name.
    let hdlr = mp4_box(b"hdlr", &[&[0; 8][..], b"mdir", b"appl", &[0; 9]].concat());
    // meta is a full box: version and flags first.
    let meta = mp4_box(b"meta", &[&[0; 4][..], &hdlr, &ilst].concat());
    UnknownBox {
        box_type: BoxType::Normal(*b"udta"),
        box_size: BoxSize::with_payload_size(BoxType::Normal(*b"udta"), meta.len() as u64),
        payload: meta,
    }
}

fn mp4_box(fourcc: &[u8; 4], payload: &[u8]) -> Vec<u8> {
    let size = u32::try_from(8 + payload.len()).expect("recipes are capped far below 4 GiB");
    [&size.to_be_bytes()[..], fourcc, payload].concat()
}

/// Puts `moov` where the muxer put its own: in place when it fits there (with a `free` box
/// after it for the rest of the room), else at the end of the file with the old room freed.
fn replace_moov(mp4: &mut Vec<u8>, moov: &[u8]) -> Option<()> {
    let boxes = child_boxes(mp4)?;
    let at = boxes.iter().position(|b| &b.fourcc == b"moov")?;
    let old = boxes[at].range.clone();
    if old.end == mp4.len() {
        mp4.truncate(old.start);
        mp4.extend_from_slice(moov);
        return Some(());
    }
    // The room is the old moov plus a free box right after it, if any.
    let room = match boxes.get(at + 1).filter(|b| &b.fourcc == b"free") {
        Some(free) => old.start..free.range.end,
        None => old,
    };
    match room.len().checked_sub(moov.len()) {
        Some(spare) if spare == 0 || spare >= 8 => {
            mp4[room.start..room.start + moov.len()].copy_from_slice(moov);
            if spare > 0 {
                write_free_header(mp4, room.start + moov.len(), spare);
            }
        }
        // Moving the media data would break the sample offsets, so the moov moves instead.
        _ => {
            write_free_header(mp4, room.start, room.len());
            mp4.extend_from_slice(moov);
        }
    }
    Some(())
}

fn write_free_header(mp4: &mut [u8], at: usize, size: usize) {
    let size = u32::try_from(size).expect("the room reserved for moov is far below 4 GiB");
    mp4[at..at + 4].copy_from_slice(&size.to_be_bytes());
    mp4[at + 4..at + 8].copy_from_slice(b"free");
}

/// One box found by [`child_boxes`]: its type, its bytes (header included), and where its
/// payload starts.
struct BoxSpan {
    fourcc: [u8; 4],
    range: std::ops::Range<usize>,
    payload_start: usize,
}

/// The boxes laid end to end in `bytes` (a file or a box's payload), or None if a size does
/// not fit.
fn child_boxes(bytes: &[u8]) -> Option<Vec<BoxSpan>> {
    let mut boxes = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let size = u32::from_be_bytes(rest.get(0..4)?.try_into().ok()?);
        let fourcc: [u8; 4] = rest.get(4..8)?.try_into().ok()?;
        let (header_len, len) = match size {
            // A 64-bit size follows the type.
            1 => (
                16,
                usize::try_from(u64::from_be_bytes(rest.get(8..16)?.try_into().ok()?)).ok()?,
            ),
            // The box runs to the end of its parent.
            0 => (8, rest.len()),
            n => (8, n as usize),
        };
        if len < header_len || len > rest.len() {
            return None;
        }
        boxes.push(BoxSpan {
            fourcc,
            range: at..at + len,
            payload_start: at + header_len,
        });
        at += len;
    }
    Some(boxes)
}

pub(crate) fn read_recipe(path: &Path, mp4: &[u8]) -> Result<String, VideoError> {
    let text = recipe_bytes(mp4)
        .map_err(|expected| VideoError::Malformed {
            path: path.to_path_buf(),
            expected,
        })?
        .ok_or_else(|| VideoError::NoRecipe {
            path: path.to_path_buf(),
            expected: "a ©cmt comment in moov/udta/meta/ilst",
        })?;
    String::from_utf8(text.to_vec()).map_err(|_| VideoError::Malformed {
        path: path.to_path_buf(),
        expected: "a UTF-8 recipe in the MP4 comment",
    })
}

/// The recipe's bytes from `moov/udta/meta/ilst/©cmt/data`: None when a box on that path is
/// missing, Err (what was expected) when a box does not fit inside its parent.
pub(crate) fn recipe_bytes(mp4: &[u8]) -> Result<Option<&[u8]>, &'static str> {
    const MALFORMED: &str = "MP4 boxes whose sizes fit inside their parents";
    let mut payload = mp4;
    for fourcc in RECIPE_BOX_PATH {
        let children = child_boxes(payload).ok_or(MALFORMED)?;
        let Some(child) = children.iter().find(|b| &b.fourcc == fourcc) else {
            return Ok(None);
        };
        payload = &payload[child.payload_start..child.range.end];
        if fourcc == b"meta" {
            payload = payload.get(4..).ok_or(MALFORMED)?; // version and flags
        }
    }
    payload.get(8..).map(Some).ok_or(MALFORMED) // data type and locale
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(mp4: &[u8]) -> Vec<(String, usize)> {
        let boxes = child_boxes(mp4).expect("boxes tile the file");
        boxes
            .into_iter()
            .map(|b| {
                (
                    String::from_utf8_lossy(&b.fourcc).into_owned(),
                    b.range.len(),
                )
            })
            .collect()
    }

    /// ftyp, then the muxer's moov (`old_moov` bytes of payload) with `free` bytes of room after
    /// it, then mdat; returns the file and the mdat's byte range.
    fn faststart_file(old_moov: usize, free: usize) -> (Vec<u8>, std::ops::Range<usize>) {
        let head = [
            mp4_box(b"ftyp", &[0; 8]),
            mp4_box(b"moov", &vec![1; old_moov]),
            mp4_box(b"free", &vec![0; free]),
        ];
        let head = head.concat();
        let mdat = mp4_box(b"mdat", &[7; 20]);
        let range = head.len()..head.len() + mdat.len();
        ([head, mdat].concat(), range)
    }

    fn check_replaced(old_moov: usize, free: usize, new_moov: usize, expected: &[(&str, usize)]) {
        let (mut mp4, mdat) = faststart_file(old_moov, free);
        let mdat_bytes = mp4[mdat.clone()].to_vec();
        let moov = mp4_box(b"moov", &vec![9; new_moov]);
        replace_moov(&mut mp4, &moov).expect("moov found");
        let found = layout(&mp4);
        let expected: Vec<(String, usize)> =
            expected.iter().map(|(n, l)| (n.to_string(), *l)).collect();
        assert_eq!(found, expected);
        assert_eq!(
            mp4[mdat].to_vec(),
            mdat_bytes,
            "media data must not move: the sample offsets point at it"
        );
        let at = mp4.windows(4).position(|w| w == b"moov").expect("moov") - 4;
        assert_eq!(&mp4[at..at + moov.len()], &moov[..]);
    }

    #[test]
    fn moov_that_fits_its_room_stays_in_front() {
        // Room: 18 (old moov) + 48 (free) = 66 bytes; the new moov takes 38, free keeps 28.
        check_replaced(
            10,
            40,
            30,
            &[("ftyp", 16), ("moov", 38), ("free", 28), ("mdat", 28)],
        );
        // Exactly filling the room leaves no free box.
        check_replaced(10, 40, 58, &[("ftyp", 16), ("moov", 66), ("mdat", 28)]);
    }

    #[test]
    fn moov_too_big_for_its_room_moves_to_the_end() {
        check_replaced(
            10,
            40,
            100,
            &[("ftyp", 16), ("free", 66), ("mdat", 28), ("moov", 108)],
        );
        // 4 spare bytes cannot hold a free box header.
        check_replaced(
            10,
            40,
            54,
            &[("ftyp", 16), ("free", 66), ("mdat", 28), ("moov", 62)],
        );
    }

    #[test]
    fn moov_at_the_end_is_replaced_there() {
        let mut mp4 = [
            mp4_box(b"ftyp", &[0; 8]),
            mp4_box(b"mdat", &[7; 20]),
            mp4_box(b"moov", &[1; 10]),
        ]
        .concat();
        replace_moov(&mut mp4, &mp4_box(b"moov", &[9; 30])).expect("moov found");
        assert_eq!(
            layout(&mp4),
            [
                ("ftyp".to_string(), 16),
                ("mdat".to_string(), 28),
                ("moov".to_string(), 38)
            ]
        );
    }

    #[test]
    fn rgb_to_i420_matches_bt601_limited_range() {
        // Black, white and the primaries, as 2x2 blocks of one colour each.
        let cases = [
            ([0, 0, 0], (16, 128, 128)),
            ([255, 255, 255], (235, 128, 128)),
            ([255, 0, 0], (81, 90, 240)),
            ([0, 255, 0], (145, 54, 34)),
            ([0, 0, 255], (41, 240, 110)),
        ];
        for (rgb, expected) in cases {
            let block: Vec<u8> = rgb.repeat(4);
            let I420 { luma, cb, cr } = rgb_to_i420(&block, 2, 2);
            assert_eq!((luma[0], cb[0], cr[0]), expected, "{rgb:?}");
            assert!(luma.iter().all(|&l| l == expected.0));
        }
    }
}
