//! Stored dtypes converted to f32 at load equal PyTorch's `.to(torch.float32)`
//! bit for bit: every float8_e4m3fn and float8_e5m2 byte, random bf16 and f16
//! values, and a ComfyUI-scaled fp8 weight (weight.to(f32) * scale_weight);
//! a scaled file with an fp8 weight missing its scale is refused at open.
//! References: tests/fixtures/wan-files/dtypes.safetensors, written by
//! tools/fixtures/make_wan_files.py.

use std::path::{Path, PathBuf};

use motif_engine::weights::safetensors::{self, FileDType};
use motif_engine::weights::{SafetensorsFile, WeightSet};

fn dtypes() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/wan-files/dtypes.safetensors")
}

fn same_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let equal = g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan());
        assert!(
            equal,
            "{what}[{i}]: {g:e} ({:#010x}) != torch's {w:e} ({:#010x})",
            g.to_bits(),
            w.to_bits()
        );
    }
}

#[test]
fn fp8_bf16_f16_and_scaled_fp8_convert_as_torch_does() {
    let file = SafetensorsFile::open(dtypes()).unwrap();
    for (key, dtype) in [
        ("e4m3fn", FileDType::F8E4M3),
        ("e5m2", FileDType::F8E5M2),
        ("bf16", FileDType::BF16),
        ("f16", FileDType::F16),
        ("scaled.weight", FileDType::F8E4M3),
    ] {
        assert_eq!(file.info(key).unwrap().dtype, dtype, "{key}");
        let want = file.to_f32(&format!("{key}.f32")).unwrap();
        same_bits(key, &file.to_f32(key).unwrap(), &want);
    }
    // Through the weight set too, whole and by rows (embedding lookups).
    let set = WeightSet::open(&[dtypes()]).unwrap();
    let want = file.to_f32("scaled.weight.f32").unwrap();
    same_bits(
        "set",
        &set.read_f32("scaled.weight", &[8, 16]).unwrap(),
        &want,
    );
    let rows = set
        .read_rows_f32("scaled.weight", &[8, 16], &[5, 2])
        .unwrap();
    same_bits("rows", &rows, &[&want[80..96], &want[32..48]].concat());
}

#[test]
fn a_scaled_fp8_file_without_a_scale_is_refused_naming_the_tensor() {
    let file = SafetensorsFile::open(dtypes()).unwrap();
    let dir = std::env::temp_dir().join(format!("motif-dtypes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("no_scale.safetensors");
    let keep = ["scaled.weight", "scaled_fp8", "e5m2"];
    let tensors: Vec<(&str, FileDType, &[usize], &[u8])> = keep
        .iter()
        .map(|k| {
            let info = file.info(k).unwrap();
            (
                *k,
                info.dtype,
                info.shape.as_slice(),
                file.bytes(k).unwrap(),
            )
        })
        .collect();
    safetensors::write(&path, &tensors).unwrap();
    let e = WeightSet::open(std::slice::from_ref(&path))
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("no_scale.safetensors") && e.contains("scaled.scale_weight"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
