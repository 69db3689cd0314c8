//! The loaders against the real-size models' key lists (SD1.5 UNet,
//! AnimateDiff motion adapters v2 and v3, CLIP ViT-L/14 text model, SD VAE),
//! dumped from diffusers/transformers on the meta device by
//! tools/fixtures/key_lists.py: every key is mapped with its shape, none is
//! missing, none is left over. Runs on a plan-mode GPU: no weight memory.

mod common;

use std::sync::Arc;

use common::{plan_gpu, real_key_list};

use motif_engine::models::clip::{ClipTextConfig, ClipTextModel};
use motif_engine::models::unet_motion::{
    MotionAdapterConfig, UNetConfigFile, UNetMotionConfig, UNetMotionModel,
};
use motif_engine::models::vae::{AutoencoderKL, VaeConfig};
use motif_engine::weights::{WeightSet, Weights};
use motif_engine::{DType, Gpu, GpuOptions};

fn unet_with(adapter: &str, drop_key: Option<&str>) -> (Arc<WeightSet>, motif_engine::Result<()>) {
    let (upath, ucfg, ukeys) = real_key_list("sd15_unet");
    let (apath, acfg, akeys) = real_key_list(adapter);
    let unet: UNetConfigFile = serde_json::from_value(ucfg).unwrap();
    let adapter: MotionAdapterConfig = serde_json::from_value(acfg).unwrap();
    let config = UNetMotionConfig::resolve(&upath, &unet, Some((&apath, &adapter))).unwrap();
    let keys = ukeys
        .into_iter()
        .chain(akeys)
        .filter(|(k, _)| Some(k.as_str()) != drop_key);
    let set = Arc::new(WeightSet::from_shapes(keys));
    let gpu = plan_gpu();
    let result =
        UNetMotionModel::new(&gpu, &Weights::new(set.clone(), DType::F32), config).map(|_| ());
    (set, result)
}

#[test]
fn sd15_unet_with_motion_adapter_v2_and_v3_maps_every_key() {
    for adapter in ["motion_adapter_v2", "motion_adapter_v3"] {
        let (set, result) = unet_with(adapter, None);
        result.unwrap_or_else(|e| panic!("{adapter}: {e}"));
        assert_eq!(
            set.unused(),
            Vec::<String>::new(),
            "{adapter}: keys the loader never read"
        );
    }
}

#[test]
fn a_missing_or_misshapen_real_key_is_named() {
    let key = "down_blocks.1.motion_modules.0.transformer_blocks.0.attn2.to_q.weight";
    let (_, result) = unet_with("motion_adapter_v2", Some(key));
    let e = result.unwrap_err().to_string();
    assert!(e.contains(&format!("missing tensor `{key}`")), "{e}");

    let (_, _, mut keys) = real_key_list("clip_vit_l14_text");
    for (k, s) in keys.iter_mut() {
        if k == "text_model.encoder.layers.3.mlp.fc1.weight" {
            *s = vec![3072, 769];
        }
    }
    let (path, cfg, _) = real_key_list("clip_vit_l14_text");
    let config = ClipTextConfig::load_value(&path, cfg).unwrap();
    let gpu = plan_gpu();
    let e = ClipTextModel::new(
        &gpu,
        &Weights::new(Arc::new(WeightSet::from_shapes(keys)), DType::F32),
        config,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("text_model.encoder.layers.3.mlp.fc1.weight")
            && e.contains("[3072, 769], expected [3072, 768]"),
        "{e}"
    );
}

#[test]
fn clip_vit_l14_text_model_maps_every_key() {
    let (path, cfg, keys) = real_key_list("clip_vit_l14_text");
    let config = ClipTextConfig::load_value(&path, cfg).unwrap();
    let set = Arc::new(WeightSet::from_shapes(keys));
    let gpu = plan_gpu();
    ClipTextModel::new(&gpu, &Weights::new(set.clone(), DType::F32), config).unwrap();
    // Some checkpoints also carry a `position_ids` buffer, which is not a weight.
    let unused: Vec<String> = set
        .unused()
        .into_iter()
        .filter(|k| !k.ends_with("position_ids"))
        .collect();
    assert_eq!(unused, Vec::<String>::new());
}

#[test]
fn sd_vae_maps_every_key() {
    let (_, cfg, keys) = real_key_list("sd_vae");
    let config: VaeConfig = serde_json::from_value(cfg).unwrap();
    let set = Arc::new(WeightSet::from_shapes(keys));
    let gpu = plan_gpu();
    AutoencoderKL::new(&gpu, &Weights::new(set.clone(), DType::F32), config).unwrap();
    assert_eq!(set.unused(), Vec::<String>::new());
}

#[test]
fn a_full_size_unet_step_plans_within_8_gib_in_f16() {
    // The plan walks the 512x512, 16-frame, batch-2 step through the
    // allocator: the peak is a measured figure, and the AnimateDiff target is
    // that it fits an 8 GB card in f16.
    let gpu = Gpu::new(GpuOptions {
        plan: true,
        precision: Some(DType::F16),
        ..Default::default()
    })
    .unwrap();
    if !gpu.has_f16() {
        return;
    }
    let report =
        motif_engine::bench::bench_unet(&gpu, &motif_engine::bench::UNetBench::full_size(), 1)
            .unwrap();
    assert!(
        report.peak_bytes > 2 << 30,
        "implausibly small plan: {} bytes",
        report.peak_bytes
    );
    assert!(
        report.peak_bytes <= 8 << 30,
        "peak {} bytes exceeds 8 GiB",
        report.peak_bytes
    );
}
