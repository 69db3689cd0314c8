//! Single-file checkpoints: SD1.5 with original LDM names (UNet, VAE and
//! CLIP in one file), standalone VAE files, and AnimateDiff motion modules
//! in their original format. The real-size key lists (tools/fixtures/
//! key_lists.py, from the original LDM classes) must map completely, with
//! configs inferred from shapes equal to the published diffusers configs;
//! the tiny fixture files (tools/fixtures/make_single_file.py) load through
//! `ModelSource` (their numbers are checked by `motif conformance` on
//! tests/fixtures/single-file).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use motif_engine::models::clip::{ClipTextConfig, ClipTextModel};
use motif_engine::models::source::{ModelSource, ModelSpec};
use motif_engine::models::unet_motion::{
    MotionAdapterConfig, UNetConfigFile, UNetMotionConfig, UNetMotionModel,
};
use motif_engine::models::vae::{AutoencoderKL, VaeConfig};
use motif_engine::weights::single_file::{self, KeyShapes};
use motif_engine::weights::{WeightSet, Weights};
use motif_engine::{DType, Tensor};

fn unused_under(set: &WeightSet, prefix: &str) -> Vec<String> {
    set.unused()
        .into_iter()
        .filter(|k| k.starts_with(prefix))
        .collect()
}

#[test]
fn sd15_ldm_checkpoint_with_original_motion_modules_maps_every_key() {
    let (path, _, keys) = real("sd15_ldm");
    let gpu = common::plan_gpu();

    // UNet + motion module, configs inferred from shapes.
    let unet = single_file::ldm_unet(&keys, &path).unwrap();
    let inferred_unet: UNetConfigFile = serde_json::from_value(unet.config.clone()).unwrap();
    let (rpath, rcfg, _) = real("sd15_unet");
    let published: UNetConfigFile = serde_json::from_value(rcfg).unwrap();
    for (mm, diffusers_name) in [
        ("mm_sd_v15_v2", "motion_adapter_v2"),
        ("v3_sd15_mm", "motion_adapter_v3"),
    ] {
        let (mpath, _, mkeys) = real(mm);
        let motion = single_file::motion_module(&mkeys, &mpath).unwrap();
        let inferred_adapter: MotionAdapterConfig =
            serde_json::from_value(motion.config.clone()).unwrap();
        let (apath, acfg, _) = real(diffusers_name);
        let published_adapter: MotionAdapterConfig = serde_json::from_value(acfg).unwrap();
        let from_shapes =
            UNetMotionConfig::resolve(&path, &inferred_unet, Some((&mpath, &inferred_adapter)))
                .unwrap();
        let from_configs =
            UNetMotionConfig::resolve(&rpath, &published, Some((&apath, &published_adapter)))
                .unwrap();
        assert_eq!(
            format!("{from_shapes:?}"),
            format!("{from_configs:?}"),
            "{mm}: inferred config differs"
        );

        let mut aliases = unet.aliases.clone();
        aliases.extend(motion.aliases);
        let set = Arc::new(
            WeightSet::from_shapes(keys.clone().into_iter().chain(mkeys)).with_aliases(aliases),
        );
        UNetMotionModel::new(&gpu, &Weights::new(set.clone(), DType::F32), from_shapes)
            .unwrap_or_else(|e| panic!("{mm}: {e}"));
        assert_eq!(
            unused_under(&set, "model.diffusion_model."),
            Vec::<String>::new(),
            "{mm}: UNet keys never read"
        );
        // The second attention's copy of each position table is the only
        // motion key left: the original stores the same table twice.
        let left: Vec<String> = unused_under(&set, "")
            .into_iter()
            .filter(|k| {
                k.contains("motion_modules") && !k.ends_with("attention_blocks.1.pos_encoder.pe")
            })
            .collect();
        assert_eq!(left, Vec::<String>::new(), "{mm}: motion keys never read");
    }

    // VAE
    let vae = single_file::ldm_vae(&keys, single_file::LDM_VAE_PREFIX, &path).unwrap();
    let config = VaeConfig::from_value(&path, vae.config).unwrap();
    let (_, vcfg, _) = real("sd_vae");
    assert_eq!(config.block_out_channels, vec![128, 256, 512, 512]);
    assert_eq!(
        format!("{config:?}"),
        format!("{:?}", serde_json::from_value::<VaeConfig>(vcfg).unwrap())
    );
    let set = Arc::new(WeightSet::from_shapes(keys.clone()).with_aliases(vae.aliases));
    AutoencoderKL::new(&gpu, &Weights::new(set.clone(), DType::F32), config).unwrap();
    assert_eq!(
        unused_under(&set, "first_stage_model."),
        Vec::<String>::new()
    );

    // CLIP
    let clip = single_file::ldm_clip(&keys, &path).unwrap();
    let config = ClipTextConfig::load_value(&path, clip.config).unwrap();
    let (cpath, ccfg, _) = real("clip_vit_l14_text");
    assert_eq!(
        format!("{config:?}"),
        format!("{:?}", ClipTextConfig::load_value(&cpath, ccfg).unwrap())
    );
    let set = Arc::new(WeightSet::from_shapes(keys).with_aliases(clip.aliases));
    ClipTextModel::new(&gpu, &Weights::new(set.clone(), DType::F32), config).unwrap();
    let left: Vec<String> = unused_under(&set, "cond_stage_model.")
        .into_iter()
        .filter(|k| !k.ends_with("position_ids"))
        .collect();
    assert_eq!(left, Vec::<String>::new());
}

fn real(name: &str) -> (PathBuf, serde_json::Value, KeyShapes) {
    let (path, config, keys) = common::real_key_list(name);
    (path, config, keys.into_iter().collect())
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/single-file")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn spec(model: &str, adapter: Option<&str>, vae: Option<&str>) -> ModelSpec {
    ModelSpec {
        model: model.into(),
        motion_adapter: adapter.map(Into::into),
        vae: vae.map(Into::into),
        ..Default::default()
    }
}

#[test]
fn a_separate_vae_file_replaces_the_one_inside() {
    // vae_tiny_ldm.safetensors holds the checkpoint's own VAE, alone and
    // without the `first_stage_model.` prefix: both decode identically.
    let gpu = common::gpu();
    let decode = |source: &ModelSource| {
        let part = source.vae().unwrap();
        let vae =
            AutoencoderKL::new(gpu, &Weights::new(part.weights, DType::F32), part.config).unwrap();
        let latents: Vec<f32> = (0..2 * 4 * 6 * 4)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.1)
            .collect();
        let t = Tensor::from_f32(gpu, &latents, &[2, 4, 6, 4], DType::F32).unwrap();
        (
            vae.decode(gpu, &t).unwrap().to_f32(gpu).unwrap(),
            part.origin,
        )
    };
    let model = fixture("sd15_tiny_ldm.safetensors");
    let (inside, origin_inside) = decode(&ModelSource::open(&spec(&model, None, None)).unwrap());
    let (alone, origin_alone) = decode(
        &ModelSource::open(&spec(
            &model,
            None,
            Some(&fixture("vae_tiny_ldm.safetensors")),
        ))
        .unwrap(),
    );
    assert!(
        origin_alone.ends_with("vae_tiny_ldm.safetensors")
            && origin_inside.ends_with("sd15_tiny_ldm.safetensors")
    );
    assert_eq!(inside, alone);
    assert!(inside.iter().any(|&v| v != 0.0));
}

#[test]
fn wrong_files_get_errors_that_say_what_to_pass() {
    let model = fixture("sd15_tiny_ldm.safetensors");
    let mm = fixture("mm_tiny_v2.safetensors");
    let err = |r: Result<_, motif_engine::error::LoadError>| r.expect_err("an error").to_string();

    // An SD checkpoint alone has no motion modules.
    let source = ModelSource::open(&spec(&model, None, None)).unwrap();
    let e = err(source.unet().map(|_| ()));
    assert!(
        e.contains("sd15_tiny_ldm.safetensors") && e.contains("--motion-adapter"),
        "{e}"
    );
    // A motion module is not a model, and a model is not a motion module.
    let e = err(ModelSource::open(&spec(&mm, None, None)).map(|_| ()));
    assert!(
        e.contains("motion module") && e.contains("--motion-adapter"),
        "{e}"
    );
    let source = ModelSource::open(&spec(&model, Some(&model), None)).unwrap();
    let e = err(source.unet().map(|_| ()));
    assert!(e.contains("not an AnimateDiff motion module"), "{e}");
    // A motion module is not a VAE.
    let source = ModelSource::open(&spec(&model, Some(&mm), Some(&mm))).unwrap();
    let e = err(source.vae().map(|_| ()));
    assert!(
        e.contains("mm_tiny_v2.safetensors") && e.contains("not a VAE"),
        "{e}"
    );
    // A single file without a VAE inside asks for --vae.
    let dir = std::env::temp_dir().join(format!("motif-sf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = motif_engine::weights::SafetensorsFile::open(&model).unwrap();
    let names: Vec<&str> = file
        .names()
        .filter(|k| k.starts_with("model.diffusion_model."))
        .collect();
    let unet_only: Vec<(&str, _, &[usize], &[u8])> = names
        .iter()
        .map(|&k| {
            let info = file.info(k).unwrap();
            (k, info.dtype, info.shape.as_slice(), file.bytes(k).unwrap())
        })
        .collect();
    let stripped = dir.join("unet_only.safetensors");
    motif_engine::weights::safetensors::write(&stripped, &unet_only).unwrap();
    let source = ModelSource::open(&spec(stripped.to_str().unwrap(), Some(&mm), None)).unwrap();
    let e = err(source.vae().map(|_| ()));
    assert!(e.contains("no VAE inside") && e.contains("--vae"), "{e}");
    let e = err(source.text_encoder().map(|_| ()));
    assert!(e.contains("no CLIP text encoder"), "{e}");
    // Pickles are refused, with the reason.
    let ckpt = dir.join("model.ckpt");
    std::fs::write(&ckpt, b"not read").unwrap();
    let e = err(ModelSource::open(&spec(ckpt.to_str().unwrap(), None, None)).map(|_| ()));
    assert!(e.contains("model.ckpt") && e.contains("code"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
