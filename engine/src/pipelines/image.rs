//! Still images given to a generation (image animation; later a last image
//! or video frames): the type and the fit to the clip's size.

/// Stills smaller than this on a side are refused: there is nothing in
/// them to animate, and every resize would invent it all.
pub const MIN_IMAGE_SIDE: usize = 16;

/// An RGB image with values in [0, 1], row-major, 3 channels interleaved.
#[derive(Debug, Clone)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

/// Resizes (bilinear) and centre-crops `image` to cover width × height.
pub fn fit_image(image: &RgbImage, width: usize, height: usize) -> Vec<f32> {
    let scale = (width as f32 / image.width as f32).max(height as f32 / image.height as f32);
    let (sw, sh) = (image.width as f32 * scale, image.height as f32 * scale);
    let (ox, oy) = ((sw - width as f32) / 2.0, (sh - height as f32) / 2.0);
    let mut out = vec![0f32; width * height * 3];
    let px = |x: usize, y: usize, k: usize| image.data[(y * image.width + x) * 3 + k];
    for y in 0..height {
        for x in 0..width {
            let fx = ((x as f32 + 0.5 + ox) / scale - 0.5).clamp(0.0, (image.width - 1) as f32);
            let fy = ((y as f32 + 0.5 + oy) / scale - 0.5).clamp(0.0, (image.height - 1) as f32);
            let (x0, y0) = (fx.floor() as usize, fy.floor() as usize);
            let (x1, y1) = (
                (x0 + 1).min(image.width - 1),
                (y0 + 1).min(image.height - 1),
            );
            let (tx, ty) = (fx - x0 as f32, fy - y0 as f32);
            for k in 0..3 {
                let top = px(x0, y0, k) * (1.0 - tx) + px(x1, y0, k) * tx;
                let bottom = px(x0, y1, k) * (1.0 - tx) + px(x1, y1, k) * tx;
                out[(y * width + x) * 3 + k] = top * (1.0 - ty) + bottom * ty;
            }
        }
    }
    out
}

/// `image` fitted to width × height as [3, H, W] in [-1, 1], the VAE
/// encoder's input.
pub fn image_to_chw(image: &RgbImage, width: usize, height: usize) -> Vec<f32> {
    let fitted = fit_image(image, width, height);
    let mut chw = vec![0f32; 3 * width * height];
    for p in 0..width * height {
        for k in 0..3 {
            chw[k * width * height + p] = fitted[p * 3 + k] * 2.0 - 1.0;
        }
    }
    chw
}

/// The image as bytes, as a PNG decoder gives them (values are k / 255).
pub fn to_rgb8(image: &RgbImage) -> Vec<u8> {
    image
        .data
        .iter()
        .map(|&v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
        .collect()
}

/// Pillow's resampling filters (`Image.Resampling`), as `resample`
/// numbers in processor configs name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PilFilter {
    Bilinear,
    Bicubic,
    Lanczos,
}

impl PilFilter {
    /// `PIL.Image.Resampling`'s numbers: 1 LANCZOS, 2 BILINEAR, 3 BICUBIC.
    pub fn from_pil(number: u64) -> Option<Self> {
        match number {
            1 => Some(PilFilter::Lanczos),
            2 => Some(PilFilter::Bilinear),
            3 => Some(PilFilter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            PilFilter::Bilinear => 1.0,
            PilFilter::Bicubic => 2.0,
            PilFilter::Lanczos => 3.0,
        }
    }

    /// Pillow's `Resample.c` kernels (bicubic with a = -0.5).
    fn weight(self, x: f64) -> f64 {
        let sinc = |x: f64| {
            if x == 0.0 {
                1.0
            } else {
                (x * std::f64::consts::PI).sin() / (x * std::f64::consts::PI)
            }
        };
        match self {
            PilFilter::Bilinear => (1.0 - x.abs()).max(0.0),
            PilFilter::Bicubic => {
                let (a, x) = (-0.5, x.abs());
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
            PilFilter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// Pillow's fixed-point precision for 8-bit images (`PRECISION_BITS`).
const PIL_PRECISION_BITS: u32 = 32 - 8 - 2;

/// One axis of Pillow's `precompute_coeffs`: per output pixel, the first
/// input pixel and the fixed-point weights of the ones it reads. The
/// support widens with the downscale factor (antialiasing).
fn pil_coefficients(in_size: usize, out_size: usize, filter: PilFilter) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C casts truncate toward zero; the clamp makes that a floor here.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let weights: Vec<f64> = (xmin..xmax)
                .map(|x| filter.weight((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let scaled = w * f64::from(1u32 << PIL_PRECISION_BITS);
                    // normalize_coeffs_8bpc rounds half away from zero.
                    if scaled < 0.0 {
                        (scaled - 0.5) as i32
                    } else {
                        (scaled + 0.5) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn pil_clip8(acc: i64) -> u8 {
    if acc >= (1i64 << PIL_PRECISION_BITS) << 8 {
        255
    } else if acc <= 0 {
        0
    } else {
        (acc >> PIL_PRECISION_BITS) as u8
    }
}

/// `PIL.Image.resize((out_w, out_h), filter)` of an RGB8 image [H, W, 3],
/// bit for bit: a horizontal pass over the rows the vertical pass reads,
/// rounded to bytes, then the vertical pass (Pillow's `ImagingResample`).
pub fn pil_resize(
    rgb: &[u8],
    (width, height): (usize, usize),
    (out_w, out_h): (usize, usize),
    filter: PilFilter,
) -> Vec<u8> {
    if (out_w, out_h) == (width, height) {
        return rgb.to_vec();
    }
    let horizontal = pil_coefficients(width, out_w, filter);
    let vertical = pil_coefficients(height, out_h, filter);
    let round = 1i64 << (PIL_PRECISION_BITS - 1);
    // Pillow skips a pass whose size does not change.
    let (rows, first_row, tmp_w) = if out_w != width {
        let first = vertical.first().map_or(0, |(y, _)| *y);
        let last = vertical.last().map_or(0, |(y, k)| y + k.len());
        let first = if out_h != height { first } else { 0 };
        let last = if out_h != height { last } else { height };
        let mut tmp = vec![0u8; (last - first) * out_w * 3];
        for y in first..last {
            for (xx, (xmin, k)) in horizontal.iter().enumerate() {
                for c in 0..3 {
                    let acc: i64 = k
                        .iter()
                        .enumerate()
                        .map(|(i, &w)| {
                            i64::from(rgb[(y * width + xmin + i) * 3 + c]) * i64::from(w)
                        })
                        .sum();
                    tmp[((y - first) * out_w + xx) * 3 + c] = pil_clip8(acc + round);
                }
            }
        }
        (tmp, first, out_w)
    } else {
        (rgb.to_vec(), 0, width)
    };
    if out_h == height {
        return rows;
    }
    let mut out = vec![0u8; out_h * tmp_w * 3];
    for (yy, (ymin, k)) in vertical.iter().enumerate() {
        for x in 0..tmp_w {
            for c in 0..3 {
                let acc: i64 = k
                    .iter()
                    .enumerate()
                    .map(|(i, &w)| {
                        i64::from(rows[((ymin - first_row + i) * tmp_w + x) * 3 + c]) * i64::from(w)
                    })
                    .sum();
                out[(yy * tmp_w + x) * 3 + c] = pil_clip8(acc + round);
            }
        }
    }
    out
}

fn default_true() -> bool {
    true
}

/// `{"shortest_edge": S}` or `{"height": H, "width": W}` of a processor config.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ProcessorSize {
    #[serde(default)]
    pub shortest_edge: Option<usize>,
    #[serde(default)]
    pub height: Option<usize>,
    #[serde(default)]
    pub width: Option<usize>,
}

/// `image_processor/preprocessor_config.json` (transformers'
/// `CLIPImageProcessor`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ClipImageProcessor {
    #[serde(default = "default_true")]
    pub do_resize: bool,
    pub size: ProcessorSize,
    /// Pillow's filter number (3: bicubic, CLIP's).
    #[serde(default = "default_resample")]
    pub resample: u64,
    #[serde(default = "default_true")]
    pub do_center_crop: bool,
    pub crop_size: ProcessorSize,
    #[serde(default = "default_true")]
    pub do_rescale: bool,
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    #[serde(default = "default_true")]
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

fn default_resample() -> u64 {
    3
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}

impl ClipImageProcessor {
    /// Reads and checks a `preprocessor_config.json`.
    pub fn load(path: &std::path::Path) -> crate::error::Result<Self, crate::error::LoadError> {
        let p: ClipImageProcessor = crate::weights::config::read_config(path)?;
        let bad = |message: String| crate::error::LoadError::Config {
            path: path.to_path_buf(),
            message,
        };
        if PilFilter::from_pil(p.resample).is_none() {
            return Err(bad(format!(
                "resample {}: Motif reproduces Pillow's LANCZOS (1), BILINEAR (2) and BICUBIC (3)",
                p.resample
            )));
        }
        let crop = p.crop();
        if p.do_center_crop && crop.is_none() {
            return Err(bad("crop_size needs height and width".into()));
        }
        if p.do_resize {
            match (p.size.shortest_edge, p.size.height, p.size.width) {
                (Some(s), _, _) if s > 0 => {
                    // A crop past the resized image would pad with zeros:
                    // no CLIP checkpoint does that, and it is not reproduced.
                    if let (true, Some((h, w))) = (p.do_center_crop, crop) {
                        if h > s || w > s {
                            return Err(bad(format!(
                                "crop_size {h}x{w} is larger than size.shortest_edge {s}"
                            )));
                        }
                    }
                }
                (None, Some(h), Some(w)) if h > 0 && w > 0 => {
                    if let (true, Some((ch, cw))) = (p.do_center_crop, crop) {
                        if ch > h || cw > w {
                            return Err(bad(format!(
                                "crop_size {ch}x{cw} is larger than size {h}x{w}"
                            )));
                        }
                    }
                }
                _ => {
                    return Err(bad(
                        "size needs shortest_edge, or height and width, all positive".into(),
                    ))
                }
            }
        }
        if !p.do_center_crop || !p.do_resize {
            return Err(bad(
                "do_resize and do_center_crop must be true: the image encoder takes one fixed size"
                    .into(),
            ));
        }
        if p.image_std.contains(&0.0) {
            return Err(bad("image_std has a zero".into()));
        }
        Ok(p)
    }

    /// CLIP's own preprocessing at `size` (the shortest edge resized to it
    /// with bicubic, a centre crop of size x size, OpenAI's mean and std):
    /// what the Wan 2.1 I2V repositories' `image_processor/` says at 224,
    /// for an image encoder that comes as a single file without one.
    pub fn clip(size: usize) -> Self {
        ClipImageProcessor {
            do_resize: true,
            size: ProcessorSize {
                shortest_edge: Some(size),
                height: None,
                width: None,
            },
            resample: default_resample(),
            do_center_crop: true,
            crop_size: ProcessorSize {
                shortest_edge: None,
                height: Some(size),
                width: Some(size),
            },
            do_rescale: true,
            rescale_factor: default_rescale(),
            do_normalize: true,
            // The published configs' values, written as the f32s they
            // parse to (0.26130258 and 0.27577711 there).
            image_mean: [0.48145466, 0.4578275, 0.40821073],
            image_std: [0.26862954, 0.261_302_6, 0.275_777_1],
        }
    }

    fn crop(&self) -> Option<(usize, usize)> {
        match (self.crop_size.height, self.crop_size.width) {
            (Some(h), Some(w)) if h > 0 && w > 0 => Some((h, w)),
            _ => None,
        }
    }

    /// The (height, width) the image encoder receives.
    pub fn output_size(&self) -> (usize, usize) {
        self.crop().unwrap_or((0, 0))
    }

    /// `pixel_values` [3, h, w] of one image, as transformers' PIL backend
    /// computes them: resize with Pillow on bytes (shortest edge to S, the
    /// long edge `int(S · long / short)`), centre crop (offsets rounded
    /// down), × rescale_factor in f64 then f32, (x − mean) / std in f32.
    pub fn preprocess(&self, image: &RgbImage) -> Vec<f32> {
        let rgb = to_rgb8(image);
        let (w, h) = (image.width, image.height);
        let (out_h, out_w) = match self.size.shortest_edge {
            Some(s) => {
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                let long_out = (s as f64 * long as f64 / short as f64) as usize;
                if w <= h {
                    (long_out, s)
                } else {
                    (s, long_out)
                }
            }
            None => (self.size.height.unwrap_or(h), self.size.width.unwrap_or(w)),
        };
        let filter = PilFilter::from_pil(self.resample).expect("checked at load");
        let resized = pil_resize(&rgb, (w, h), (out_w, out_h), filter);
        let (ch, cw) = self.output_size();
        let (top, left) = (out_h.saturating_sub(ch) / 2, out_w.saturating_sub(cw) / 2);
        let mut out = vec![0f32; 3 * ch * cw];
        for y in 0..ch {
            for x in 0..cw {
                for c in 0..3 {
                    let byte = resized[((top + y) * out_w + left + x) * 3 + c];
                    let mut v = f64::from(byte) as f32;
                    if self.do_rescale {
                        v = (f64::from(byte) * self.rescale_factor) as f32;
                    }
                    if self.do_normalize {
                        v = (v - self.image_mean[c]) / self.image_std[c];
                    }
                    out[(c * ch + y) * cw + x] = v;
                }
            }
        }
        out
    }
}
