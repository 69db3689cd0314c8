//! Stored element types converted to f32 at load: f32, f16, bf16, and the
//! 8-bit floats of fp8 checkpoints — float8_e4m3fn and float8_e5m2, plain or
//! ComfyUI's `scaled` files. Conversions are exact (every f16, bf16 and fp8
//! value is an f32), equal bit for bit to PyTorch's `.to(torch.float32)`.
//!
//! Scaled fp8 (ComfyUI's convention, `comfy/ops.py` `scaled_fp8_ops`): a
//! weight `X.weight` stored in fp8 with a per-tensor f32 `X.scale_weight`
//! beside it, and a `scaled_fp8` marker tensor in the file; the weight is
//! `X.weight.to(f32) * X.scale_weight`. (`X.scale_input` serves fp8
//! matmuls and is not needed to dequantise.) A scaled file with an fp8
//! weight that lacks its scale is refused when the file is opened: loading
//! it unscaled would silently change every output.

use half::{bf16, f16};

use super::safetensors::{FileDType, SafetensorsFile};
use crate::error::LoadError;

/// float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no
/// infinities, S.1111.111 is NaN; exponent 0 holds the subnormals m/8 · 2⁻⁶.
pub fn e4m3fn_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = i32::from((b >> 3) & 0x0f);
    let man = f32::from(b & 0x07);
    if exp == 0x0f && b & 0x07 == 0x07 {
        return f32::NAN.copysign(sign);
    }
    if exp == 0 {
        return sign * man / 8.0 * 2f32.powi(-6);
    }
    sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
}

/// float8_e5m2: the upper byte of an IEEE f16 (bias 15, infinities, NaNs).
pub fn e5m2_to_f32(b: u8) -> f32 {
    f16::from_bits(u16::from(b) << 8).to_f32()
}

/// `bytes` of `dtype` (little-endian) as f32 values.
pub fn decode(dtype: FileDType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        FileDType::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(bytes),
        FileDType::F16 => bytemuck::pod_collect_to_vec::<u8, f16>(bytes)
            .iter()
            .map(|v| v.to_f32())
            .collect(),
        FileDType::BF16 => bytemuck::pod_collect_to_vec::<u8, bf16>(bytes)
            .iter()
            .map(|v| v.to_f32())
            .collect(),
        FileDType::F8E4M3 => bytes.iter().map(|&b| e4m3fn_to_f32(b)).collect(),
        FileDType::F8E5M2 => bytes.iter().map(|&b| e5m2_to_f32(b)).collect(),
        FileDType::I64 => bytemuck::pod_collect_to_vec::<u8, i64>(bytes)
            .iter()
            .map(|&v| v as f32)
            .collect(),
        FileDType::U8 => bytes.iter().map(|&v| f32::from(v)).collect(),
    }
}

fn is_fp8(dtype: FileDType) -> bool {
    matches!(dtype, FileDType::F8E4M3 | FileDType::F8E5M2)
}

/// The scale key of an fp8 weight: `X.weight` → `X.scale_weight`.
fn scale_key(key: &str) -> Option<String> {
    key.strip_suffix("weight")
        .map(|stem| format!("{stem}scale_weight"))
}

/// The per-tensor scale of `key` in `file`, if it is a scaled fp8 weight.
pub fn scale_of(file: &SafetensorsFile, key: &str) -> Result<Option<f32>, LoadError> {
    let Some(info) = file.info(key) else {
        return Ok(None);
    };
    if !is_fp8(info.dtype) {
        return Ok(None);
    }
    let Some(scale) = scale_key(key).filter(|k| file.info(k).is_some()) else {
        return Ok(None);
    };
    let values = decode(
        file.info(&scale).expect("checked").dtype,
        file.bytes(&scale)?,
    );
    match values.as_slice() {
        [v] => Ok(Some(*v)),
        _ => Err(LoadError::TensorShape {
            path: file.path().to_path_buf(),
            key: scale,
            expected: vec![],
            found: file.info(key).map(|i| i.shape.clone()).unwrap_or_default(),
        }),
    }
}

/// A tensor as f32: decoded, and for a scaled fp8 weight times its scale.
pub fn tensor_f32(file: &SafetensorsFile, key: &str) -> Result<Vec<f32>, LoadError> {
    let info = file.info(key).ok_or_else(|| LoadError::MissingTensor {
        path: file.path().to_path_buf(),
        key: key.to_string(),
    })?;
    let mut values = decode(info.dtype, file.bytes(key)?);
    if let Some(scale) = scale_of(file, key)? {
        values.iter_mut().for_each(|v| *v *= scale);
    }
    Ok(values)
}

/// Refuses a scaled fp8 file (one with a `scaled_fp8` marker or any
/// `scale_weight`) in which an fp8 weight has no scale.
pub fn check_scales(file: &SafetensorsFile) -> Result<(), LoadError> {
    let names: Vec<&str> = file.names().collect();
    let scaled = names
        .iter()
        .any(|k| *k == "scaled_fp8" || k.ends_with(".scaled_fp8") || k.ends_with(".scale_weight"));
    if !scaled {
        return Ok(());
    }
    let unscaled = names.iter().find(|k| {
        k.ends_with(".weight")
            && file.info(k).is_some_and(|i| is_fp8(i.dtype))
            && scale_key(k).is_some_and(|s| file.info(&s).is_none())
    });
    match unscaled {
        None => Ok(()),
        Some(k) => Err(LoadError::Layout {
            path: file.path().to_path_buf(),
            message: format!(
                "a scaled fp8 file (it has `scaled_fp8` / `scale_weight` tensors) whose fp8 tensor `{k}` \
                 has no `{}`: the file is incomplete; download it again, or pass the bf16/fp16 file",
                scale_key(k).unwrap_or_default()
            ),
        }),
    }
}
