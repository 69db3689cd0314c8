//! The kernel tuner and the tuning file routing reads (`motif bench --tune`).
//! On the software driver the tuner has only the portable kernels to choose
//! from, which is enough to run its whole machinery: checks, timing, the
//! choice, the file, and routing by it.

mod common;

use motif_engine::gpu::tuning::{self, Choice, KernelName, Tuning, Variant};
use motif_engine::ops::matmul::{matmul, matmul_reference, MatmulOptions};
use motif_engine::ops::route;
use motif_engine::tune::{self, Candidate, ClassShape, Trial};
use motif_engine::{DType, Gpu, GpuOptions};

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("motif-tune-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn open(dir: &std::path::Path) -> motif_engine::Result<Gpu> {
    Gpu::new(GpuOptions {
        pipeline_cache: Some(dir.to_path_buf()),
        precision: Some(DType::F32),
        ..Default::default()
    })
}

fn trial(kernel: KernelName, ms: f64, correct: bool) -> Trial {
    Trial {
        variant: Variant::plain(kernel),
        small_error: 0.0,
        small_tolerance: 0.0,
        large_error: 0.0,
        large_tolerance: 0.0,
        ms,
        tflops: 0.0,
        correct,
        error: None,
    }
}

/// The choice is the fastest among the right ones: a faster wrong one, or
/// one that failed to run, is passed over; none right, nothing chosen.
#[test]
fn choose_takes_the_fastest_correct_variant() {
    let mut failed = trial(KernelName::Subgroup, 0.1, true);
    failed.error = Some("did not compile".into());
    let trials = [
        trial(KernelName::Coop, 0.5, false),
        failed,
        trial(KernelName::Packed, 3.0, true),
        trial(KernelName::Tiled, 2.0, true),
    ];
    let chosen = tune::choose(&trials).unwrap();
    assert_eq!(chosen.variant.kernel, KernelName::Tiled);
    assert!(tune::choose(&trials[..2]).is_none());
}

/// A variant that computes wrong results — here the fastest of all, since
/// it only uploads constants — is caught by the small check against the
/// CPU reference and never chosen; the right ones are judged correct.
#[test]
fn tuner_never_chooses_a_wrong_variant() {
    let gpu = common::gpu();
    let dtype = DType::F32;
    let shape = ClassShape::Matmul {
        m: 96,
        k: 64,
        n: 80,
        transpose_b: true,
    };
    let mut candidates = tune::candidates(gpu, &shape, dtype);
    let portable = candidates.len();
    candidates.push(Candidate {
        variant: Variant {
            kernel: KernelName::Tiled,
            constants: [("WRONG".to_string(), 1.0)].into(),
        },
        run: Box::new(|gpu: &Gpu, inputs: &tune::Inputs| {
            let a = &inputs.tensors[0];
            let b = &inputs.tensors[1];
            let (m, n) = (a.shape()[0], b.shape()[0]);
            motif_engine::Tensor::from_f32(gpu, &vec![0.25; m * n], &[m, n], a.dtype())
        }),
    });
    let report = tune::tune_class(gpu, &shape, dtype, &candidates, 2).unwrap();
    let wrong = &report.trials[portable];
    assert!(!wrong.correct, "the wrong variant passed: {wrong:?}");
    for t in &report.trials[..portable] {
        assert!(t.correct, "a right variant failed: {t:?}");
    }
    let chosen = report.chosen.expect("a right variant exists");
    assert!(!chosen.constants.contains_key("WRONG"), "{chosen:?}");
}

/// Each trial routes both of its shapes — the small one checked against
/// the CPU reference and the full-size one — to the candidate, though
/// their sizes fall in different classes: a variant named by its constants
/// (attention's tensor-core variants) is checked itself, not the default.
#[test]
fn each_trial_routes_both_of_its_shapes_to_the_candidate() {
    let gpu = common::gpu();
    let dtype = DType::F32;
    let shape = ClassShape::Matmul {
        m: 1024,
        k: 64,
        n: 80,
        transpose_b: true,
    };
    let variant = Variant {
        kernel: KernelName::Tiled,
        constants: [("PROBE".to_string(), 1.0)].into(),
    };
    let seen = std::sync::Mutex::new(Vec::new());
    let candidates = vec![Candidate {
        variant: variant.clone(),
        run: Box::new(|gpu: &Gpu, inputs: &tune::Inputs| {
            let class = inputs.shape.class(dtype);
            let routed = gpu.tuning().choice("matmul", &class).cloned();
            seen.lock().unwrap().push((class, routed));
            let (a, b) = (&inputs.tensors[0], &inputs.tensors[1]);
            let opts = MatmulOptions {
                transpose_b: true,
                ..Default::default()
            };
            matmul(gpu, a, b, &opts)
        }),
    }];
    tune::tune_class(gpu, &shape, dtype, &candidates, 1).unwrap();
    drop(candidates);
    let seen = seen.into_inner().unwrap();
    let classes: std::collections::BTreeSet<_> = seen.iter().map(|(c, _)| c.clone()).collect();
    assert_eq!(classes.len(), 2, "a small and a full-size class: {seen:?}");
    for (class, routed) in &seen {
        assert_eq!(
            routed.as_ref(),
            Some(&variant),
            "class {class} not routed to the candidate"
        );
    }
}

/// The kernels that ran, by entry point, for one product.
fn kernels_of_one_product(gpu: &Gpu) -> Vec<String> {
    let (m, k, n) = (64, 96, 48);
    let (a, av) = common::upload(gpu, &common::random(m * k, 1), &[m, k], DType::F32);
    let (b, bv) = common::upload(gpu, &common::random(n * k, 2), &[n, k], DType::F32);
    let opts = MatmulOptions {
        transpose_b: true,
        ..Default::default()
    };
    assert!(gpu.start_timer(), "the software driver has timestamps");
    let out = matmul(gpu, &a, &b, &opts).unwrap();
    let kernels = gpu.stop_timer_by_kernel().unwrap().unwrap();
    let want = matmul_reference(&av, &[m, k], &bv, &[n, k], None, None, &opts);
    common::assert_close(
        "tuned matmul",
        &out.to_f32(gpu).unwrap(),
        &want,
        DType::F32,
        k,
    );
    // By name: the timer lists them by time, an order that load changes.
    let mut names: Vec<String> = kernels.into_iter().map(|k| k.kernel).collect();
    names.sort();
    names
}

/// A tuning file beside the pipeline cache routes its class to the kernel
/// it names (here the tiled kernel where the software driver's default is
/// the packed one), and MOTIF_TUNING=off's option ignores it.
#[test]
fn the_tuning_file_routes_its_class() {
    let dir = temp_dir("routes");
    let untuned = open(&dir).unwrap();
    let default_kernels = kernels_of_one_product(&untuned);
    // The kernel the tuning file names is the other one.
    let (named, entry) = if default_kernels.iter().any(|k| k == "gemm_packed") {
        (KernelName::Tiled, "matmul_tiled")
    } else {
        (KernelName::Packed, "gemm_packed")
    };
    let info = untuned.adapter_info();
    drop(untuned);
    let mut t = Tuning::new(&info);
    t.choices.push(Choice {
        op: "matmul".into(),
        class: route::matmul_class(DType::F32, 64, 96, 48, true),
        variant: Variant::plain(named),
        ms: 1.0,
    });
    t.save(&tuning::path_for(&info, Some(dir.clone())).unwrap())
        .unwrap();
    let tuned = open(&dir).unwrap();
    let tuned_kernels = kernels_of_one_product(&tuned);
    assert!(
        tuned_kernels.iter().any(|k| k == entry),
        "tuned to {named:?}, ran {tuned_kernels:?} (untuned: {default_kernels:?})"
    );
    drop(tuned);
    let off = Gpu::new(GpuOptions {
        pipeline_cache: Some(dir.clone()),
        precision: Some(DType::F32),
        no_tuning: true,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(kernels_of_one_product(&off), default_kernels);
}

/// A damaged tuning file, or one measured on another adapter, is refused
/// with an error naming the file — not silently replaced by defaults.
#[test]
fn a_bad_tuning_file_is_refused_with_its_path() {
    let dir = temp_dir("bad");
    let info = open(&dir).unwrap().adapter_info();
    let path = tuning::path_for(&info, Some(dir.clone())).unwrap();
    std::fs::write(&path, "{ not json").unwrap();
    let err = open(&dir)
        .err()
        .expect("a damaged file is refused")
        .to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");

    let mut other = Tuning::new(&info);
    other.adapter = "another GPU".into();
    other.save(&path).unwrap();
    let err = open(&dir)
        .err()
        .expect("another adapter's file is refused")
        .to_string();
    assert!(err.contains("another GPU"), "{err}");
}

/// The whole tuner on the software driver: every class gets a right
/// variant, the file is written and read back, and routing follows it.
#[test]
fn tune_writes_a_choice_for_every_class() {
    let dir = temp_dir("whole");
    let gpu = open(&dir).unwrap();
    let shapes = vec![
        ClassShape::Matmul {
            m: 64,
            k: 128,
            n: 64,
            transpose_b: true,
        },
        ClassShape::Conv2d {
            x: [1, 8, 12, 12],
            w: [8, 8, 3, 3],
        },
        ClassShape::Attention {
            batch: 1,
            tokens: 64,
            heads: 2,
            head_dim: 40,
        },
    ];
    let (reports, tuning) = tune::tune(&gpu, &shapes, DType::F32, 1, None, &mut |_| {}).unwrap();
    assert_eq!(reports.len(), shapes.len());
    for r in &reports {
        assert!(
            r.chosen.is_some(),
            "no choice for {}: {:?}",
            r.class,
            r.trials
        );
        assert!(r.trials.iter().all(|t| t.correct), "{:?}", r.trials);
    }
    assert_eq!(tuning.choices.len(), shapes.len());
    let path = tuning::path_for(&gpu.adapter_info(), Some(dir.clone())).unwrap();
    tuning.save(&path).unwrap();
    let back = Tuning::load(&path, &gpu.adapter_info()).unwrap();
    // The choices come back whole; the measured milliseconds to within
    // serde_json's float parsing (not always the last bit without its
    // float_roundtrip feature).
    assert_eq!(back.choices.len(), tuning.choices.len());
    for (b, t) in back.choices.iter().zip(&tuning.choices) {
        assert_eq!((&b.op, &b.class, &b.variant), (&t.op, &t.class, &t.variant));
        assert!(
            (b.ms - t.ms).abs() <= 1e-12 * t.ms.abs().max(1.0),
            "{b:?} vs {t:?}"
        );
    }
}
