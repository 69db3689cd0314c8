//! safetensors loading: round trips in every stored dtype, sharded folders,
//! and a clear error naming the file for every kind of broken input.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::gpu;
use half::{bf16, f16};
use motif_engine::error::LoadError;
use motif_engine::weights::{safetensors, FileDType, SafetensorsFile, WeightSet, Weights};
use motif_engine::DType;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("motif-weights-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

fn write_sample(path: &Path) -> Vec<f32> {
    let vals: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
    let h: Vec<f16> = vals.iter().map(|&v| f16::from_f32(v)).collect();
    let b: Vec<bf16> = vals.iter().map(|&v| bf16::from_f32(v)).collect();
    safetensors::write(
        path,
        &[
            ("a.weight", FileDType::F32, &[2, 3], &f32_bytes(&vals)),
            ("b.weight", FileDType::F16, &[6], bytemuck::cast_slice(&h)),
            (
                "c.weight",
                FileDType::BF16,
                &[3, 2],
                bytemuck::cast_slice(&b),
            ),
        ],
    )
    .unwrap();
    vals
}

#[test]
fn every_stored_dtype_reads_back_and_uploads() {
    let dir = tmp("roundtrip");
    let path = dir.join("model.safetensors");
    let vals = write_sample(&path);
    let file = SafetensorsFile::open(&path).unwrap();
    assert_eq!(
        file.names().collect::<Vec<_>>(),
        ["a.weight", "b.weight", "c.weight"]
    );
    for key in ["a.weight", "b.weight", "c.weight"] {
        // The sample values are exact in f16 and bf16.
        assert_eq!(file.to_f32(key).unwrap(), vals, "{key}");
    }
    let set = Arc::new(WeightSet::open(&[path]).unwrap());
    let w = Weights::new(set.clone(), DType::F32);
    let t = w.pp("c").tensor(gpu(), "weight", &[3, 2]).unwrap();
    assert_eq!(t.to_f32(gpu()).unwrap(), vals);
    if gpu().has_f16() {
        let w16 = Weights::new(set.clone(), DType::F16);
        for (key, shape) in [("a", vec![2, 3]), ("b", vec![6]), ("c", vec![3, 2])] {
            let t = w16.pp(key).tensor(gpu(), "weight", &shape).unwrap();
            assert_eq!(t.dtype(), DType::F16);
            assert_eq!(t.to_f32(gpu()).unwrap(), vals, "{key} as f16");
        }
    }
    // Reads are tracked, so that a loader can report keys it never used.
    let expected_unused: Vec<String> = if gpu().has_f16() {
        vec![]
    } else {
        vec!["a.weight".into(), "b.weight".into()]
    };
    assert_eq!(set.unused(), expected_unused);
}

#[test]
fn missing_and_misshapen_tensors_name_the_key_and_file() {
    let dir = tmp("missing");
    let path = dir.join("unet.safetensors");
    write_sample(&path);
    let w = Weights::new(Arc::new(WeightSet::open(&[path]).unwrap()), DType::F32);
    let e = w
        .pp("down_blocks")
        .pp(0)
        .tensor(gpu(), "conv.weight", &[4])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unet.safetensors") && e.contains("missing tensor `down_blocks.0.conv.weight`"),
        "{e}"
    );
    let e = w
        .pp("a")
        .tensor(gpu(), "weight", &[3, 2])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`a.weight` has shape [2, 3], expected [3, 2]"),
        "{e}"
    );
    // No tensor is optional: an absent bias is a missing tensor too.
    let e = w
        .pp("a")
        .tensor(gpu(), "bias", &[3])
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing tensor `a.bias`"), "{e}");
}

/// Builds a file from a raw header and data section.
fn raw_file(
    dir: &Path,
    name: &str,
    header: &str,
    data_len: usize,
    header_len_field: Option<u64>,
) -> PathBuf {
    let path = dir.join(name);
    let mut bytes = header_len_field
        .unwrap_or(header.len() as u64)
        .to_le_bytes()
        .to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, data_len));
    std::fs::write(&path, bytes).unwrap();
    path
}

fn open_err(path: &Path) -> String {
    match SafetensorsFile::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn corrupt_files_are_refused_with_the_reason() {
    let dir = tmp("corrupt");
    let tiny = dir.join("tiny.safetensors");
    std::fs::write(&tiny, [1u8, 2, 3]).unwrap();
    let e = open_err(&tiny);
    assert!(
        e.contains("tiny.safetensors") && e.contains("fewer than the 8-byte header length"),
        "{e}"
    );

    // A header length field past the end (the classic truncated download) fails without reading on.
    let p = raw_file(&dir, "len.safetensors", "{}", 0, Some(1 << 40));
    let e = open_err(&p);
    assert!(
        e.contains("len.safetensors") && e.contains("runs past the end of the file"),
        "{e}"
    );

    let p = raw_file(&dir, "json.safetensors", "{not json", 0, None);
    assert!(open_err(&p).contains("not valid JSON"));

    let ok = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let p = raw_file(&dir, "good.safetensors", ok, 8, None);
    assert!(SafetensorsFile::open(&p).is_ok());

    let p = raw_file(&dir, "truncated.safetensors", ok, 4, None);
    let e = open_err(&p);
    assert!(
        e.contains("tensor `w`")
            && e.contains("past the end of the data section")
            && e.contains("truncated"),
        "{e}"
    );

    let rev = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#;
    let e = open_err(&raw_file(&dir, "rev.safetensors", rev, 8, None));
    assert!(e.contains("tensor `w`") && e.contains("reversed"), "{e}");

    let span = r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
    let e = open_err(&raw_file(&dir, "span.safetensors", span, 8, None));
    assert!(
        e.contains("shape [3] of F32 needs 12 bytes") && e.contains("span 8"),
        "{e}"
    );

    let i8 = r#"{"q":{"dtype":"I8","shape":[8],"data_offsets":[0,8]}}"#;
    let err = SafetensorsFile::open(raw_file(&dir, "i8.safetensors", i8, 8, None))
        .err()
        .unwrap();
    assert!(matches!(err, LoadError::UnsupportedDType { .. }));
    assert!(
        err.to_string().contains("`q` has dtype I8") && err.to_string().contains("F32, F16, BF16"),
        "{err}"
    );

    let shape = r#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,8]}}"#;
    assert!(open_err(&raw_file(&dir, "neg.safetensors", shape, 8, None))
        .contains("non-negative integers"));
}

/// One broken file: its header, data length and the phrases its refusal must
/// hold (besides the file's name, which every refusal must hold).
struct Broken {
    name: &'static str,
    header: &'static str,
    data_len: usize,
    expected: &'static [&'static str],
}

/// Opens each file and lists every refusal that is missing, does not name the
/// file, or lacks an expected phrase (all of them, so that one run shows
/// every rule the reader breaks).
fn refusals_that_fall_short(dir: &Path, cases: &[Broken]) -> Vec<String> {
    cases
        .iter()
        .filter_map(|case| {
            let path = raw_file(dir, case.name, case.header, case.data_len, None);
            let message = match SafetensorsFile::open(&path) {
                Ok(_) => return Some(format!("{}: opened", case.name)),
                Err(e) => e.to_string(),
            };
            let named = message.contains(case.name);
            let explained = case.expected.iter().all(|p| message.contains(p));
            (!named || !explained).then(|| format!("{}: {message}", case.name))
        })
        .collect()
}

/// The format's own rules, enforced by its reference reader: files that lay
/// tensors out with gaps, overlaps or trailing bytes, use a dtype the format
/// does not define, or hold non-string metadata are not safetensors files.
#[test]
fn files_the_format_forbids_are_refused_naming_the_tensor() {
    let dir = tmp("format-rules");
    let cases = [
        Broken {
            name: "gap.safetensors",
            header: r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
            data_len: 12,
            expected: &["tensor `b`", "[8, 12]", "gap after byte 4"],
        },
        Broken {
            name: "overlap.safetensors",
            header: r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            data_len: 12,
            expected: &["tensor `b`", "[4, 12]", "overlap", "ends at byte 8"],
        },
        Broken {
            name: "shared.safetensors",
            header: r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            data_len: 8,
            expected: &["tensor `b`", "[0, 8]", "overlap"],
        },
        Broken {
            name: "trailing.safetensors",
            header: r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            data_len: 12,
            expected: &[
                "12 bytes of data",
                "cover 8",
                "no bytes after the last tensor",
            ],
        },
        Broken {
            name: "q4.safetensors",
            header: r#"{"q":{"dtype":"Q4_0","shape":[8],"data_offsets":[0,4]}}"#,
            data_len: 4,
            expected: &["tensor `q`", "unknown variant `Q4_0`"],
        },
        Broken {
            name: "meta.safetensors",
            header: r#"{"__metadata__":{"epochs":3},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            data_len: 8,
            expected: &["`__metadata__` must map strings to strings"],
        },
    ];
    let failures = refusals_that_fall_short(&dir, &cases);
    assert!(failures.is_empty(), "{failures:#?}");

    // A header length over the format's limit is refused before the header
    // is read, even where the file is long enough to hold it (a sparse file).
    let path = dir.join("huge.safetensors");
    let huge: u64 = 100_000_001;
    std::fs::write(&path, huge.to_le_bytes()).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(8 + huge))
        .unwrap();
    let e = open_err(&path);
    assert!(
        e.contains("huge.safetensors") && e.contains("exceeds the format's 100 MB limit"),
        "{e}"
    );
}

/// Every other class of header refusal names the file, and the tensor where
/// there is one; dtypes the format defines but Motif does not compute with
/// are refused by name (typed, so callers can tell them from corruption).
#[test]
fn every_header_refusal_names_the_file() {
    let dir = tmp("refusals");
    let cases = [
        Broken {
            name: "noheader.safetensors",
            header: "",
            data_len: 0,
            expected: &["not valid JSON"],
        },
        Broken {
            name: "array.safetensors",
            header: "[1, 2]",
            data_len: 0,
            expected: &["not a JSON object"],
        },
        Broken {
            name: "nodtype.safetensors",
            header: r#"{"w":{"shape":[2],"data_offsets":[0,8]}}"#,
            data_len: 8,
            expected: &["tensor `w`", "missing field `dtype`"],
        },
        Broken {
            name: "overflow.safetensors",
            header: r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#,
            data_len: 8,
            expected: &["tensor `w`", "byte size overflows"],
        },
        Broken {
            name: "nibbles.safetensors",
            header: r#"{"w":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#,
            data_len: 2,
            expected: &["tensor `w`", "byte boundary"],
        },
        Broken {
            name: "f64.safetensors",
            header: r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F64","shape":[1],"data_offsets":[4,12]}}"#,
            data_len: 12,
            expected: &["tensor `w` has dtype F64", "F32, F16, BF16"],
        },
    ];
    let failures = refusals_that_fall_short(&dir, &cases);
    assert!(failures.is_empty(), "{failures:#?}");
    let path = dir.join("empty.safetensors");
    std::fs::write(&path, b"").unwrap();
    let e = open_err(&path);
    assert!(
        e.contains("empty.safetensors") && e.contains("has 0 bytes, fewer than the 8-byte"),
        "{e}"
    );

    // "café" in Latin-1: the 0xE9 byte is not UTF-8.
    let path = dir.join("latin1.safetensors");
    let header = b"{\"caf\xe9\":1}";
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    std::fs::write(&path, bytes).unwrap();
    let e = open_err(&path);
    assert!(
        e.contains("latin1.safetensors") && e.contains("not UTF-8"),
        "{e}"
    );

    let f64 = SafetensorsFile::open(dir.join("f64.safetensors")).err();
    assert!(
        matches!(f64, Some(LoadError::UnsupportedDType { ref key, .. }) if key == "w"),
        "{f64:?}"
    );
}

/// The writer is the format's own: what it writes, the reader reads back,
/// and a byte count that disagrees with the shape is refused, naming the tensor.
#[test]
fn written_files_read_back_and_bad_tensors_are_not_written() {
    let dir = tmp("writer");
    let path = dir.join("w.safetensors");
    let e = safetensors::write(&path, &[("w", FileDType::F32, &[3], &[0u8; 8])])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("w.safetensors")
            && e.contains("tensor `w`")
            && e.contains("needs 12 bytes, 8 given"),
        "{e}"
    );
    assert!(!path.exists(), "a refused write left a file");
    let ids: Vec<u8> = [3i64, -1].iter().flat_map(|v| v.to_le_bytes()).collect();
    safetensors::write(
        &path,
        &[
            ("w", FileDType::F32, &[2], &f32_bytes(&[1.5, -2.0])),
            ("ids", FileDType::I64, &[2], &ids),
        ],
    )
    .unwrap();
    let file = SafetensorsFile::open(&path).unwrap();
    assert_eq!(file.to_f32("w").unwrap(), vec![1.5, -2.0]);
    assert_eq!(file.to_i64("ids").unwrap(), vec![3, -1]);
}

#[test]
fn pickle_checkpoints_are_refused_with_how_to_convert() {
    let dir = tmp("pickle");
    for name in ["model.ckpt", "model.pt", "pytorch_model.bin"] {
        let p = dir.join(name);
        std::fs::write(&p, b"not read").unwrap();
        let e = WeightSet::open(std::slice::from_ref(&p))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(name) && e.contains("arbitrary code") && e.contains("safetensors"),
            "{e}"
        );
    }
    // A diffusers folder with only a pickle file is refused the same way.
    let comp = dir.join("unet");
    std::fs::create_dir_all(&comp).unwrap();
    std::fs::write(comp.join("diffusion_pytorch_model.bin"), b"x").unwrap();
    let e = WeightSet::open_dir(&comp).err().unwrap().to_string();
    assert!(
        e.contains("diffusion_pytorch_model.bin") && e.contains("arbitrary code"),
        "{e}"
    );
}

#[test]
fn folders_load_single_files_shards_and_prefer_full_precision() {
    let dir = tmp("folders");
    let single = dir.join("vae");
    std::fs::create_dir_all(&single).unwrap();
    write_sample(&single.join("diffusion_pytorch_model.safetensors"));
    safetensors::write(
        single.join("diffusion_pytorch_model.fp16.safetensors"),
        &[("x", FileDType::F32, &[1], &f32_bytes(&[1.0]))],
    )
    .unwrap();
    let set = WeightSet::open_dir(&single).unwrap();
    assert!(set.contains("a.weight") && !set.contains("x"));

    let sharded = dir.join("text_encoder");
    std::fs::create_dir_all(&sharded).unwrap();
    safetensors::write(
        sharded.join("model-00001-of-00002.safetensors"),
        &[("p", FileDType::F32, &[1], &f32_bytes(&[1.0]))],
    )
    .unwrap();
    safetensors::write(
        sharded.join("model-00002-of-00002.safetensors"),
        &[("q", FileDType::F32, &[1], &f32_bytes(&[2.0]))],
    )
    .unwrap();
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        r#"{"metadata":{},"weight_map":{"p":"model-00001-of-00002.safetensors","q":"model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let set = WeightSet::open_dir(&sharded).unwrap();
    assert_eq!(set.read_f32("q", &[1]).unwrap(), vec![2.0]);
    assert_eq!(set.keys().len(), 2);

    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = WeightSet::open_dir(&empty).err().unwrap().to_string();
    assert!(e.contains("empty") && e.contains("no .safetensors"), "{e}");

    // The same key in two files is ambiguous.
    let dup = dir.join("dup");
    std::fs::create_dir_all(&dup).unwrap();
    write_sample(&dup.join("a.safetensors"));
    write_sample(&dup.join("b.safetensors"));
    let e = WeightSet::open_dir(&dup).err().unwrap().to_string();
    assert!(e.contains("is also in"), "{e}");
}

#[test]
fn repo_ids_resolve_offline_in_the_hugging_face_cache() {
    use motif_engine::weights::folder::{component_dir, resolve_in_cache};
    let cache = tmp("hfcache");
    let repo = cache.join("models--guoyww--animatediff-motion-adapter-v1-5-2");
    let snap = repo.join("snapshots").join("abc123");
    std::fs::create_dir_all(&snap).unwrap();
    // With only one snapshot, refs/main is optional.
    assert_eq!(
        resolve_in_cache(&cache, "guoyww/animatediff-motion-adapter-v1-5-2").unwrap(),
        snap
    );
    let other = repo.join("snapshots").join("def456");
    std::fs::create_dir_all(&other).unwrap();
    let e = resolve_in_cache(&cache, "guoyww/animatediff-motion-adapter-v1-5-2")
        .unwrap_err()
        .to_string();
    assert!(e.contains("several snapshots"), "{e}");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "def456\n").unwrap();
    assert_eq!(
        resolve_in_cache(&cache, "guoyww/animatediff-motion-adapter-v1-5-2").unwrap(),
        other
    );
    std::fs::write(repo.join("refs").join("main"), "0000").unwrap();
    let e = resolve_in_cache(&cache, "guoyww/animatediff-motion-adapter-v1-5-2")
        .unwrap_err()
        .to_string();
    assert!(e.contains("names snapshot `0000`"), "{e}");

    let e = resolve_in_cache(&cache, "runwayml/stable-diffusion-v1-5")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not in the Hugging Face cache") && e.contains("never downloads"),
        "{e}"
    );

    let e = component_dir(&snap, "unet").unwrap_err().to_string();
    assert!(e.contains("missing the `unet/` folder"), "{e}");
}

#[test]
fn configs_with_non_finite_numbers_parse_and_bad_fields_are_named() {
    use motif_engine::weights::config::{lenient_f64, read_config};
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Sched {
        num_train_timesteps: usize,
        #[serde(deserialize_with = "lenient_f64")]
        lambda_min_clipped: f64,
    }
    let dir = tmp("config");
    let p = dir.join("scheduler_config.json");
    std::fs::write(&p, r#"{"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "lambda_min_clipped": -Infinity}"#).unwrap();
    let s: Sched = read_config(&p).unwrap();
    assert_eq!(s.lambda_min_clipped, f64::NEG_INFINITY);
    std::fs::write(
        &p,
        r#"{"num_train_timesteps": "many", "lambda_min_clipped": 0}"#,
    )
    .unwrap();
    let e = read_config::<Sched>(&p).unwrap_err().to_string();
    assert!(
        e.contains("scheduler_config.json") && e.contains("invalid type") && e.contains("many"),
        "{e}"
    );
    std::fs::write(&p, r#"{"lambda_min_clipped": 0}"#).unwrap();
    let e = read_config::<Sched>(&p).unwrap_err().to_string();
    assert!(e.contains("missing field `num_train_timesteps`"), "{e}");
}
