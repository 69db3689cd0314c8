//! Still images given to a generation (image animation; later a last image
//! or video frames): the type and the fit to the clip's size.

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
