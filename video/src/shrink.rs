//! Makes an MP4 written by [`crate::write_clip`] small enough for an upload limit (Discord
//! refuses attachments over the server's limit, often 10 MiB). The clip is decoded back to
//! 4:2:0 pictures and encoded again through the writer's own H.264 path at coarser settings,
//! one step of [`LADDER`] after another, until a result fits. Frame rate, frame count and the
//! embedded recipe are kept.
//!
//! Pictures stay in YCbCr from decoder to encoder: going through RGB would add a rounding
//! step and depend on the decoder converting with the matrix the writer used.

use std::num::NonZeroU32;

use openh264::decoder::{DecodedYUV, Decoder, DecoderConfig};
use openh264::formats::YUVSource;
use openh264::OpenH264API;
use shiguredo_mp4::boxes::{AvccBox, SampleEntry};
use shiguredo_mp4::demux::{DemuxError, Input, Mp4FileDemuxer};
use shiguredo_mp4::{BaseBox, TrackKind};

use crate::mp4::{mux, recipe_bytes, FrameTiming, H264Encoder, I420};
use crate::VideoError;

/// One way of encoding the clip again.
#[derive(Debug, Clone, Copy)]
struct Attempt {
    /// Halve width and height (each rounded down to even) before encoding.
    half_size: bool,
    /// Constant H.264 quantiser; the writer uses 18.
    qp: u8,
}

/// Tried in order; the first result that fits is kept. A coarser quantiser at full size comes
/// first because it keeps more of the picture than halving does; each 6 QP steps roughly
/// halve the bitrate.
const LADDER: [Attempt; 4] = [
    Attempt {
        half_size: false,
        qp: 28,
    },
    Attempt {
        half_size: false,
        qp: 34,
    },
    Attempt {
        half_size: true,
        qp: 30,
    },
    Attempt {
        half_size: true,
        qp: 40,
    },
];

const START_CODE: [u8; 4] = [0, 0, 0, 1];

pub(crate) fn shrink(mp4: &[u8], max_bytes: usize) -> Result<Option<Vec<u8>>, VideoError> {
    let track = demux(mp4)?;
    let recipe = recipe_bytes(mp4).map_err(|expected| VideoError::NotMp4 {
        message: format!("its metadata boxes do not parse; expected {expected}"),
    })?;
    if mp4.len() <= max_bytes {
        return Ok(Some(mp4.to_vec()));
    }
    for attempt in LADDER {
        let size = if attempt.half_size {
            (halved_to_even(track.width), halved_to_even(track.height))
        } else {
            (track.width, track.height)
        };
        if size.0 == 0 || size.1 == 0 {
            continue;
        }
        if let Some(shrunk) = reencode(&track, size, attempt.qp, recipe, max_bytes)? {
            return Ok(Some(shrunk));
        }
    }
    Ok(None)
}

/// The video track of an MP4, as far as re-encoding needs it.
struct VideoTrack<'a> {
    width: usize,
    height: usize,
    timing: FrameTiming,
    avcc: AvccBox,
    /// Each sample's bytes: NAL units prefixed with their length in `avcc`'s length size.
    samples: Vec<&'a [u8]>,
}

/// Finds the first video track and checks that it is H.264 at a constant frame rate with
/// every sample inside the file.
fn demux(mp4: &[u8]) -> Result<VideoTrack<'_>, VideoError> {
    let not_mp4 = |error: DemuxError| VideoError::NotMp4 {
        message: match error {
            // The demuxer was given the whole file, so what it still needs lies past the end.
            DemuxError::InputRequired(_) => format!("it ends early ({error})"),
            _ => error.to_string(),
        },
    };
    let unsupported = |found: String, expected| VideoError::UnsupportedVideo { found, expected };
    let mut demuxer = Mp4FileDemuxer::new();
    demuxer.handle_input(Input {
        position: 0,
        data: mp4,
    });
    let (track_id, timescale) = demuxer
        .tracks()
        .map_err(not_mp4)?
        .iter()
        .find(|track| track.kind == TrackKind::Video)
        .map(|track| (track.track_id, track.timescale))
        .ok_or(VideoError::NoVideoTrack)?;

    let mut avcc = None;
    let mut size = None;
    let mut ticks_per_frame = None;
    let mut samples = Vec::new();
    let mut samples_seen = 0usize;
    while let Some(sample) = demuxer.next_sample().map_err(not_mp4)? {
        // Every real sample holds at least one byte, so a file cannot have more samples than
        // bytes; this bounds the loop when a damaged table claims billions of them.
        samples_seen += 1;
        if samples_seen > mp4.len() {
            return Err(VideoError::NotMp4 {
                message: format!(
                    "its sample tables list more samples than the file's {} bytes could hold",
                    mp4.len()
                ),
            });
        }
        if sample.track.track_id != track_id {
            continue;
        }
        let index = samples.len();
        match (sample.sample_entry, &avcc) {
            (None, _) => {}
            (Some(SampleEntry::Avc1(avc1)), None) => {
                size = Some((avc1.visual.width as usize, avc1.visual.height as usize));
                avcc = Some(avc1.avcc_box.clone());
            }
            (Some(SampleEntry::Avc1(_)), Some(_)) => {
                return Err(unsupported(
                    format!("a second avc1 sample entry from sample {index} on"),
                    "one H.264 configuration for the whole track",
                ));
            }
            (Some(other), _) => {
                return Err(VideoError::NotH264 {
                    found: other.box_type().to_string(),
                });
            }
        }
        let first_duration = *ticks_per_frame.get_or_insert(sample.duration);
        if sample.duration != first_duration {
            return Err(unsupported(
                format!(
                    "sample {index} lasting {} ticks after samples of {first_duration}",
                    sample.duration
                ),
                "a constant frame rate (every sample equally long)",
            ));
        }
        let data = usize::try_from(sample.data_offset)
            .ok()
            .and_then(|start| mp4.get(start..start.checked_add(sample.data_size)?))
            .ok_or_else(|| VideoError::NotMp4 {
                message: format!(
                    "video sample {index} ({} bytes at offset {}) lies outside the file of {} bytes",
                    sample.data_size,
                    sample.data_offset,
                    mp4.len()
                ),
            })?;
        samples.push(data);
    }

    let (Some(avcc), Some((width, height)), Some(ticks_per_frame)) = (avcc, size, ticks_per_frame)
    else {
        return Err(unsupported(
            "a video track with no samples".to_string(),
            "at least one frame",
        ));
    };
    let ticks_per_frame = NonZeroU32::new(ticks_per_frame).ok_or_else(|| {
        unsupported(
            "samples lasting 0 ticks".to_string(),
            "a frame rate (samples of at least 1 tick)",
        )
    })?;
    if width == 0 || height == 0 || width % 2 == 1 || height % 2 == 1 {
        return Err(unsupported(
            format!("frame size {width}x{height}"),
            "even width and height of at least 2 (H.264 4:2:0)",
        ));
    }
    Ok(VideoTrack {
        width,
        height,
        timing: FrameTiming {
            timescale,
            ticks_per_frame,
        },
        avcc,
        samples,
    })
}

/// Decodes every sample and encodes it again at `size` and `qp`; None as soon as the encoded
/// frames alone outgrow `max_bytes`, or when the finished file does.
fn reencode(
    track: &VideoTrack,
    size: (usize, usize),
    qp: u8,
    recipe: Option<&[u8]>,
    max_bytes: usize,
) -> Result<Option<Vec<u8>>, VideoError> {
    let decode_error = |index: usize, message: String| VideoError::Decode {
        message: format!("sample {index}: {message}"),
    };
    let reencode_error = |codec| move |message| VideoError::Reencode { codec, message };
    let mut decoder = Decoder::with_api_config(OpenH264API::from_source(), DecoderConfig::new())
        .map_err(|e| VideoError::Decode {
            message: e.to_string(),
        })?;
    let mut encoder = H264Encoder::new(size.0, size.1, track.timing.fps(), qp)
        .map_err(reencode_error("H.264"))?;
    let length_size = track.avcc.length_size_minus_one.get() as usize + 1;

    let mut frames = Vec::with_capacity(track.samples.len());
    let mut media_bytes = 0;
    let mut annexb = Vec::new();
    for (index, sample) in track.samples.iter().enumerate() {
        annexb.clear();
        if index == 0 {
            // The writer keeps the parameter sets only in avcC; the decoder needs them in the
            // stream before the first slice.
            for parameter_set in track.avcc.sps_list.iter().chain(&track.avcc.pps_list) {
                annexb.extend_from_slice(&START_CODE);
                annexb.extend_from_slice(parameter_set);
            }
        }
        append_annexb(sample, length_size, &mut annexb).ok_or_else(|| {
            decode_error(
                index,
                format!("a NAL unit length ({length_size}-byte prefix) runs past the sample's end"),
            )
        })?;
        // Constrained baseline has no frame reordering, so every sample gives its picture at
        // once; a sample that gives none means the stream is not what the writer makes.
        let picture = decoder
            .decode(&annexb)
            .map_err(|e| decode_error(index, e.to_string()))?
            .ok_or_else(|| decode_error(index, "no picture came out".to_string()))?;
        let picture = copy_picture(&picture, (track.width, track.height))
            .map_err(|message| decode_error(index, message))?;
        let picture = if size == (track.width, track.height) {
            picture
        } else {
            half_size(&picture, (track.width, track.height), size)
        };
        let frame = encoder.encode(&picture).map_err(reencode_error("H.264"))?;
        media_bytes += frame.sample.len();
        if media_bytes > max_bytes {
            return Ok(None);
        }
        frames.push(frame);
    }
    let mp4 = mux(&frames, track.timing, recipe).map_err(reencode_error("MP4"))?;
    Ok((mp4.len() <= max_bytes).then_some(mp4))
}

/// Appends the NAL units of an MP4 sample (each prefixed with its `length_size`-byte
/// big-endian length) to `annexb`, each after a start code; None when a length runs past the
/// end of the sample.
fn append_annexb(sample: &[u8], length_size: usize, annexb: &mut Vec<u8>) -> Option<()> {
    let mut rest = sample;
    while !rest.is_empty() {
        let (length, tail) = rest.split_at_checked(length_size)?;
        let length = length
            .iter()
            .fold(0usize, |length, &byte| length << 8 | byte as usize);
        let (nal_unit, tail) = tail.split_at_checked(length)?;
        annexb.extend_from_slice(&START_CODE);
        annexb.extend_from_slice(nal_unit);
        rest = tail;
    }
    Some(())
}

/// The decoder's picture without its row padding; Err when its size is not `size`.
fn copy_picture(picture: &DecodedYUV, size: (usize, usize)) -> Result<I420, String> {
    if picture.dimensions() != size {
        let (width, height) = picture.dimensions();
        return Err(format!(
            "decoded a {width}x{height} picture; expected {}x{} as the avc1 sample entry says",
            size.0, size.1
        ));
    }
    let (width, height) = size;
    let (luma_stride, cb_stride, cr_stride) = picture.strides();
    let plane = |data: &[u8], stride: usize, width: usize, height: usize| {
        let mut packed = Vec::with_capacity(width * height);
        for row in 0..height {
            let start = row * stride;
            let line = data
                .get(start..start + width)
                .ok_or("the decoder's plane is shorter than its size and stride")?;
            packed.extend_from_slice(line);
        }
        Ok::<_, String>(packed)
    };
    Ok(I420 {
        luma: plane(picture.y(), luma_stride, width, height)?,
        cb: plane(picture.u(), cb_stride, width / 2, height / 2)?,
        cr: plane(picture.v(), cr_stride, width / 2, height / 2)?,
    })
}

/// Half of `side`, rounded down to even as 4:2:0 needs.
fn halved_to_even(side: usize) -> usize {
    side / 4 * 2
}

/// Shrinks a picture of `from` (even sides) to `to` (even, at most half of `from` each way)
/// with a 2x2 box filter on every plane; the rows and columns past twice `to` are dropped.
fn half_size(picture: &I420, from: (usize, usize), to: (usize, usize)) -> I420 {
    let plane = |data: &[u8], from_width: usize, width: usize, height: usize| {
        let mut out = Vec::with_capacity(width * height);
        for y in 0..height {
            let top = &data[2 * y * from_width..];
            let bottom = &data[(2 * y + 1) * from_width..];
            for x in 0..width {
                let sum = top[2 * x] as u32
                    + top[2 * x + 1] as u32
                    + bottom[2 * x] as u32
                    + bottom[2 * x + 1] as u32;
                out.push(((sum + 2) / 4) as u8);
            }
        }
        out
    };
    I420 {
        luma: plane(&picture.luma, from.0, to.0, to.1),
        cb: plane(&picture.cb, from.0 / 2, to.0 / 2, to.1 / 2),
        cr: plane(&picture.cr, from.0 / 2, to.0 / 2, to.1 / 2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_size_averages_2x2_blocks_and_drops_the_odd_edge() {
        // 6x4 luma (3x2 chroma) to 2x2 (1x1): the last two columns are dropped, since 6 / 2 = 3
        // rounds down to 2.
        #[rustfmt::skip]
        let luma = vec![
            0, 4,   10, 10,  99, 99,
            8, 4,   20, 21,  99, 99,
            1, 1,   255, 255, 99, 99,
            1, 2,   255, 254, 99, 99,
        ];
        let picture = I420 {
            luma,
            cb: vec![10, 20, 99, 30, 40, 99],
            cr: vec![1, 2, 99, 4, 4, 99],
        };
        assert_eq!([6, 64, 96, 2].map(halved_to_even), [2, 32, 48, 0]);
        let half = half_size(&picture, (6, 4), (2, 2));
        // (0+4+8+4)/4 = 4; (10+10+20+21)/4 = 15.25 -> 15; (1+1+1+2)/4 = 1.25 -> 1;
        // (255*3+254)/4 = 254.75 -> 255.
        assert_eq!(half.luma, [4, 15, 1, 255]);
        assert_eq!(half.cb, [25]);
        // (1+2+4+4)/4 = 2.75 -> 3.
        assert_eq!(half.cr, [3]);
    }

    #[test]
    fn append_annexb_swaps_lengths_for_start_codes() {
        let mut annexb = Vec::new();
        append_annexb(&[0, 0, 0, 2, 0x65, 1, 0, 0, 0, 1, 0x41], 4, &mut annexb).expect("fits");
        assert_eq!(annexb, [0, 0, 0, 1, 0x65, 1, 0, 0, 0, 1, 0x41]);

        let mut annexb = Vec::new();
        append_annexb(&[0, 3, 7, 8, 9], 2, &mut annexb).expect("fits");
        assert_eq!(annexb, [0, 0, 0, 1, 7, 8, 9]);

        // A length past the end, and a length prefix cut short.
        assert_eq!(append_annexb(&[0, 0, 0, 5, 1, 2], 4, &mut Vec::new()), None);
        assert_eq!(append_annexb(&[0, 0, 0], 4, &mut Vec::new()), None);
    }
}
