//! LoRA fusing against diffusers: the reference cases in tests/fixtures/lora
//! (tools/fixtures/make_lora_cases.py: PEFT with adapter metadata, kohya
//! LoCon, an AnimateDiff motion LoRA, kohya names on the LDM layout) through
//! the conformance runner in f32 and f16; the fused values on a single-file
//! (LDM) checkpoint; and the refusals, each naming the file and the key.

use std::path::{Path, PathBuf};

use motif_engine::error::LoadError;
use motif_engine::models::source::{ModelSource, ModelSpec};
use motif_engine::weights::safetensors::write;
use motif_engine::weights::{FileDType, SafetensorsFile};
#[path = "common/lora_cases.rs"]
mod lora_cases;
use lora_cases::{case_set_passes_in_f32_and_f16, fixtures, manifest};

#[test]
fn lora_cases_match_diffusers_in_f32_and_f16() {
    case_set_passes_in_f32_and_f16("lora");
}

#[test]
fn every_lora_case_differs_from_the_plain_model_beyond_both_budgets() {
    // Otherwise a runner that ignored the LoRA would pass the cases above.
    let dir = fixtures().join("lora");
    let tensors = SafetensorsFile::open(dir.join("cases.safetensors")).unwrap();
    let mut checked = 0;
    for case in manifest(&dir)["cases"].as_array().unwrap() {
        if case["inputs"].get("lora").is_none() {
            continue;
        }
        let out = &case["outputs"][0];
        let name = out["tensor"].as_str().unwrap();
        let expected = tensors.to_f32(name).unwrap();
        // The same output without a LoRA: `no_lora_<component>.<output>`.
        let component = case["component"].as_str().unwrap();
        let output = name.split_once('.').unwrap().1;
        let reference = tensors
            .to_f32(&format!("no_lora_{component}.{output}"))
            .unwrap();
        let diff = expected
            .iter()
            .zip(&reference)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let max = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        let tol = out["tolerance_max_abs"].as_f64().unwrap() as f32;
        assert!(
            diff > 100.0 * tol && diff > 3e-2 * max,
            "{name}: differs by only {diff} (f32 tolerance {tol}, f16 budget {})",
            3e-2 * max
        );
        checked += 1;
    }
    assert_eq!(checked, 6, "4 UNet and 2 text-encoder LoRA cases");
}

/// A scratch folder for this test binary.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("motif-lora-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes a LoRA file of f32 tensors.
fn write_lora(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| bytemuck::cast_slice(v).to_vec())
        .collect();
    let list: Vec<(&str, FileDType, &[usize], &[u8])> = tensors
        .iter()
        .zip(&bytes)
        .map(|((k, s, _), b)| (*k, FileDType::F32, s.as_slice(), b.as_slice()))
        .collect();
    write(path, &list).unwrap();
}

fn ramp(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.37 + seed).sin()) * 0.5)
        .collect()
}

/// (down [r, in], up [out, r], alpha) entries of a kohya module.
fn kohya(
    name: &str,
    out: usize,
    inp: usize,
    r: usize,
    alpha: f32,
    seed: f32,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    vec![
        (
            format!("{name}.lora_down.weight"),
            vec![r, inp],
            ramp(r * inp, seed),
        ),
        (
            format!("{name}.lora_up.weight"),
            vec![out, r],
            ramp(out * r, seed + 1.0),
        ),
        (format!("{name}.alpha"), vec![], vec![alpha]),
    ]
}

fn as_refs(t: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<(&str, Vec<usize>, Vec<f32>)> {
    t.iter()
        .map(|(k, s, v)| (k.as_str(), s.clone(), v.clone()))
        .collect()
}

/// base + weight · alpha / r · up @ down, in f64.
fn expected_fused(base: &[f32], down: &[f32], up: &[f32], r: usize, scale: f64) -> Vec<f32> {
    let cols = down.len() / r;
    base.iter()
        .enumerate()
        .map(|(i, &w)| {
            let (o, j) = (i / cols, i % cols);
            let d: f64 = (0..r)
                .map(|k| up[o * r + k] as f64 * down[k * cols + j] as f64)
                .sum();
            (w as f64 + scale * d) as f32
        })
        .collect()
}

fn single_file_spec(loras: Vec<(String, f32)>) -> ModelSpec {
    let sf = fixtures().join("single-file");
    ModelSpec {
        model: sf
            .join("sd15_tiny_ldm.safetensors")
            .to_string_lossy()
            .into(),
        motion_adapter: Some(sf.join("mm_tiny_v2.safetensors").to_string_lossy().into()),
        loras,
        ..Default::default()
    }
}

#[test]
fn a_kohya_lora_on_an_ldm_checkpoint_fuses_base_plus_weighted_update() {
    // The checkpoint stores `model.diffusion_model.input_blocks.1.1.…` and
    // `cond_stage_model.transformer.text_model.…`; the LoRA uses kohya's
    // LDM-layout UNet name and its text-encoder name. Both reach the weights
    // the loaders ask for, in diffusers names.
    let dir = scratch("ldm");
    let plain = ModelSource::open(&single_file_spec(vec![])).unwrap();
    let unet_key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight";
    let te_key = "text_model.encoder.layers.1.self_attn.q_proj.weight";
    let base_unet = plain.unet().unwrap().weights;
    let base_te = plain.text_encoder().unwrap().weights;
    let te_shape = base_te
        .keys()
        .into_iter()
        .find(|(k, _)| k.ends_with(te_key))
        .map(|(_, s)| s)
        .expect("text encoder q_proj");
    let (c, d) = (te_shape[0], te_shape[1]);
    let unet_shape = base_unet
        .keys()
        .into_iter()
        .find(|(k, _)| k.ends_with("input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"))
        .map(|(_, s)| s)
        .expect("LDM to_q");
    let (uo, ui) = (unet_shape[0], unet_shape[1]);

    let mut tensors = kohya(
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
        uo,
        ui,
        2,
        1.0,
        0.3,
    );
    tensors.extend(kohya(
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj",
        c,
        d,
        3,
        6.0,
        1.7,
    ));
    let path = dir.join("ldm_kohya.safetensors");
    write_lora(&path, &as_refs(&tensors));

    let p = path.to_string_lossy().into_owned();
    let weight = 0.5f32;
    let fused = ModelSource::open(&single_file_spec(vec![(p.clone(), weight)])).unwrap();
    let unet = fused.unet().unwrap().weights;
    let te = fused.text_encoder().unwrap().weights;
    let check = |base: &[f32], got: &[f32], t: usize, r: usize, alpha: f64| {
        let want = expected_fused(
            base,
            &tensors[t].2,
            &tensors[t + 1].2,
            r,
            weight as f64 * alpha / r as f64,
        );
        let err = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let change = got
            .iter()
            .zip(base)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err < 1e-6 && change > 1e-2, "error {err}, change {change}");
    };
    let base = base_unet.read_f32(unet_key, &[uo, ui]).unwrap();
    check(
        &base,
        &unet.read_f32(unet_key, &[uo, ui]).unwrap(),
        0,
        2,
        1.0,
    );
    let base = base_te.read_f32(te_key, &[c, d]).unwrap();
    check(&base, &te.read_f32(te_key, &[c, d]).unwrap(), 3, 3, 6.0);

    // Two LoRAs add up: the file twice at half the weight is the file once.
    let twice = ModelSource::open(&single_file_spec(vec![(p.clone(), 0.25), (p, 0.25)])).unwrap();
    let a = twice
        .text_encoder()
        .unwrap()
        .weights
        .read_f32(te_key, &[c, d])
        .unwrap();
    let b = te.read_f32(te_key, &[c, d]).unwrap();
    let err = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(err < 1e-6, "two halves differ from the whole by {err}");
    // Weights the LoRA does not name are untouched.
    let other = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight";
    assert_eq!(
        unet.read_f32(other, &[uo, ui]).unwrap(),
        base_unet.read_f32(other, &[uo, ui]).unwrap()
    );
}

/// The LoRA case set's folder as the model, with one LoRA.
fn folder_with(lora: &Path) -> Result<ModelSource, LoadError> {
    ModelSource::open(&ModelSpec {
        model: fixtures().join("lora").to_string_lossy().into(),
        loras: vec![(lora.to_string_lossy().into(), 1.0)],
        ..Default::default()
    })
}

const TO_Q: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";

#[test]
fn bad_loras_are_refused_naming_the_file_and_the_keys() {
    let dir = scratch("bad");
    let message = |r: Result<ModelSource, LoadError>| -> String {
        match r.and_then(|s| {
            s.unet()
                .map(|_| ())
                .and_then(|_| s.text_encoder().map(|_| ()))
        }) {
            Ok(()) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    };

    let missing = dir.join("missing.safetensors");
    let m = message(folder_with(&missing));
    assert!(m.contains("missing.safetensors"), "{m}");

    match folder_with(&dir.join("old_lora.pt")) {
        Err(LoadError::Pickle { path }) => assert!(path.ends_with("old_lora.pt")),
        other => panic!("expected a pickle refusal, got {other:?}"),
    }

    // Keys of another model entirely.
    let alien = dir.join("alien.safetensors");
    let mut t = kohya(
        "lora_unet_single_transformer_blocks_0_attn_to_q",
        16,
        16,
        2,
        1.0,
        0.1,
    );
    t.extend(kohya(
        "lora_unet_single_transformer_blocks_0_attn_to_k",
        16,
        16,
        2,
        1.0,
        0.2,
    ));
    write_lora(&alien, &as_refs(&t));
    let m = message(folder_with(&alien));
    assert!(
        m.contains("alien.safetensors")
            && m.contains("none of this LoRA's 2 UNet modules")
            && m.contains("single_transformer_blocks_0_attn_to_q"),
        "{m}"
    );

    // One module matches, one does not: the LoRA is not applied in part.
    let partial = dir.join("partial.safetensors");
    let mut t = kohya(TO_Q, 16, 16, 2, 1.0, 0.1);
    t.extend(kohya(
        "lora_unet_down_blocks_7_attentions_0_proj_in",
        16,
        16,
        2,
        1.0,
        0.2,
    ));
    write_lora(&partial, &as_refs(&t));
    let m = message(folder_with(&partial));
    assert!(
        m.contains("partial.safetensors")
            && m.contains("1 of this LoRA's 2 UNet modules")
            && m.contains("down_blocks_7_attentions_0_proj_in"),
        "{m}"
    );

    // The same for text-encoder modules.
    let te = dir.join("te.safetensors");
    let mut t = kohya(
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        16,
        16,
        2,
        1.0,
        0.1,
    );
    t.extend(kohya(
        "lora_te_text_model_encoder_layers_9_self_attn_q_proj",
        16,
        16,
        2,
        1.0,
        0.2,
    ));
    write_lora(&te, &as_refs(&t));
    let m = message(folder_with(&te));
    assert!(
        m.contains("1 of this LoRA's 2 text encoder modules")
            && m.contains("layers_9_self_attn_q_proj"),
        "{m}"
    );

    // Factors for a 24-wide layer on the 16-wide model.
    let wide = dir.join("wide.safetensors");
    write_lora(&wide, &as_refs(&kohya(TO_Q, 16, 24, 2, 1.0, 0.1)));
    match folder_with(&wide).and_then(|s| s.unet()) {
        Err(LoadError::TensorShape {
            path,
            key,
            expected,
            found,
        }) => {
            assert!(path.ends_with("wide.safetensors"));
            assert_eq!(key, format!("{TO_Q}.lora_down.weight"));
            assert_eq!((expected, found), (vec![2, 16], vec![2, 24]));
        }
        Err(e) => panic!("expected a shape error, got {e}"),
        Ok(_) => panic!("accepted"),
    }

    // Adapter kinds that are not plain LoRA.
    let dora = dir.join("dora.safetensors");
    let mut t = kohya(TO_Q, 16, 16, 2, 1.0, 0.1);
    t.push((format!("{TO_Q}.dora_scale"), vec![16, 1], vec![1.0; 16]));
    write_lora(&dora, &as_refs(&t));
    let m = message(folder_with(&dora));
    assert!(m.contains("DoRA") && m.contains("dora.safetensors"), "{m}");

    // A factor without its partner.
    let half = dir.join("half.safetensors");
    write_lora(&half, &as_refs(&kohya(TO_Q, 16, 16, 2, 1.0, 0.1)[..1]));
    let m = message(folder_with(&half));
    assert!(m.contains("lacks its down or up factor"), "{m}");

    // A well-formed file still loads (the errors above are not from the folder).
    let good = dir.join("good.safetensors");
    write_lora(&good, &as_refs(&kohya(TO_Q, 16, 16, 2, 1.0, 0.1)));
    folder_with(&good).unwrap().unet().unwrap();
}
