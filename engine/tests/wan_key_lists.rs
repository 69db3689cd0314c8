//! Wan single files against the real-size key lists of
//! tools/fixtures/wan_key_lists.py (dumped on the meta device from diffusers'
//! and transformers' classes and from the Wan repository's own, in both
//! namings): every original key maps to the diffusers key of the same shape
//! and back, none is missing or left over, the configs inferred from the
//! shapes equal the published ones, and the models load from the original
//! names on a plan-mode GPU (no weight memory) reading every key.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::plan_gpu;
use motif_engine::models::umt5::{BlockResidency, UMT5Config, UMT5EncoderModel};
use motif_engine::models::wan_transformer::{WanTransformer3DModel, WanTransformerConfig};
use motif_engine::models::wan_vae::{AutoencoderKLWan, WanVaeConfig};
use motif_engine::weights::wan_files::{self, WanFile};
use motif_engine::weights::{WeightSet, Weights};
use motif_engine::DType;

type Keys = BTreeMap<String, Vec<usize>>;

fn key_list(name: &str) -> (PathBuf, serde_json::Value, Keys) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/wan-keys")
        .join(format!("{name}.json"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let keys = serde_json::from_value(json["keys"].clone()).unwrap();
    (path, json["config"].clone(), keys)
}

/// `published`'s every field equals `inferred`'s (null = absent).
fn assert_config(what: &str, inferred: &serde_json::Value, published: &serde_json::Value) {
    for (field, want) in published.as_object().unwrap() {
        let got = inferred.get(field).unwrap_or(&serde_json::Value::Null);
        let equal = match (got.as_f64(), want.as_f64()) {
            (Some(a), Some(b)) => (a - b).abs() <= 1e-12 * b.abs(),
            _ => got == want,
        };
        assert!(equal, "{what}: `{field}` inferred {got}, published {want}");
    }
}

/// Every original key maps to a diffusers key of the same shape, one to
/// one, covering the diffusers list; `back` maps each diffusers key to the
/// original it came from.
fn assert_maps_both_ways(
    what: &str,
    original: &Keys,
    diffusers: &Keys,
    aliases: &std::collections::HashMap<String, String>,
    back: impl Fn(&str) -> Option<String>,
) {
    assert_eq!(aliases.len(), original.len(), "{what}: keys left unmapped");
    for (asked, stored) in aliases {
        assert_eq!(
            diffusers.get(asked),
            original.get(stored),
            "{what}: `{stored}` → `{asked}` (shapes: diffusers, original)"
        );
    }
    for key in diffusers.keys() {
        let stored = back(key).unwrap_or_else(|| panic!("{what}: `{key}` has no original name"));
        assert_eq!(aliases.get(key), Some(&stored), "{what}: `{key}` maps back");
    }
}

fn plan_load<T>(
    keys: &Keys,
    aliases: std::collections::HashMap<String, String>,
    load: impl FnOnce(&Weights) -> motif_engine::Result<T>,
) -> Arc<WeightSet> {
    let set = Arc::new(WeightSet::from_shapes(keys.clone()).with_aliases(aliases));
    load(&Weights::new(set.clone(), DType::F32)).unwrap_or_else(|e| panic!("{e}"));
    set
}

#[test]
fn wan_transformers_1_3b_and_14b_map_both_ways_with_their_published_configs() {
    let gpu = plan_gpu();
    for tag in ["1.3B", "14B"] {
        let (path, _, original) = key_list(&format!("transformer-{tag}.wan"));
        let (_, published, diffusers) = key_list(&format!("transformer-{tag}.diffusers"));
        assert_eq!(wan_files::detect(&original), Some(WanFile::Transformer));
        let inferred = wan_files::transformer(&original, &path, None).unwrap();
        assert_config(tag, &inferred.config, &published);
        assert_maps_both_ways(
            tag,
            &original,
            &diffusers,
            &inferred.aliases,
            wan_files::transformer_key_original,
        );
        // ComfyUI files saved whole carry the prefix: same config, same map.
        let prefixed: Keys = original
            .iter()
            .map(|(k, s)| (format!("{}{k}", wan_files::WAN_PREFIX), s.clone()))
            .collect();
        assert_eq!(wan_files::detect(&prefixed), Some(WanFile::Transformer));
        let with_prefix = wan_files::transformer(&prefixed, &path, None).unwrap();
        assert_eq!(with_prefix.config, inferred.config);
        let config: WanTransformerConfig = serde_json::from_value(inferred.config).unwrap();
        let set = plan_load(&prefixed, with_prefix.aliases, |w| {
            WanTransformer3DModel::new(&gpu, w, config, BlockResidency::Resident)
        });
        assert_eq!(set.unused(), Vec::<String>::new(), "{tag}: keys never read");
    }
}

#[test]
fn umt5_xxl_maps_from_both_namings_with_its_published_config() {
    let gpu = plan_gpu();
    let (_, published, transformers) = key_list("umt5-xxl.transformers");
    for naming in ["transformers", "wan"] {
        let (path, _, keys) = key_list(&format!("umt5-xxl.{naming}"));
        let inferred = wan_files::umt5(&keys, &path).unwrap();
        assert_config(naming, &inferred.config, &published);
        let back = |k: &str| match naming {
            "wan" => keys
                .keys()
                .find(|o| wan_files::umt5_key(o).as_deref() == Some(k))
                .cloned(),
            _ => Some(k.to_string()),
        };
        assert_maps_both_ways(naming, &keys, &transformers, &inferred.aliases, back);
        let config: UMT5Config = serde_json::from_value(inferred.config).unwrap();
        let set = plan_load(&keys, inferred.aliases, |w| {
            UMT5EncoderModel::new(&gpu, w, config, BlockResidency::Resident)
        });
        // The embedding table is looked up on the host per prompt, never
        // read whole at load.
        assert_eq!(set.unused(), vec![inferred_table(&keys)], "{naming}");
    }
}

/// The stored name of UMT5's embedding table.
fn inferred_table(keys: &Keys) -> String {
    ["shared.weight", "token_embedding.weight"]
        .into_iter()
        .find(|k| keys.contains_key(*k))
        .unwrap()
        .to_string()
}

#[test]
fn wan_vae_maps_both_ways_with_its_published_config() {
    let gpu = plan_gpu();
    let (path, _, original) = key_list("vae.wan");
    let (_, published, diffusers) = key_list("vae.diffusers");
    assert_eq!(wan_files::detect(&original), Some(WanFile::Vae));
    let inferred = wan_files::vae(&original, &path).unwrap();
    assert_config("vae", &inferred.config, &published);
    assert_maps_both_ways("vae", &original, &diffusers, &inferred.aliases, |k| {
        wan_files::vae_key_original(k, 2)
    });
    let config = WanVaeConfig::from_value(&path, inferred.config).unwrap();
    let set = plan_load(&original, inferred.aliases, |w| {
        AutoencoderKLWan::new(&gpu, w, config)
    });
    assert_eq!(set.unused(), Vec::<String>::new());
}

#[test]
fn a_umt5_file_is_not_a_transformer_and_heads_need_wan_widths() {
    let (path, _, umt5) = key_list("umt5-xxl.transformers");
    assert_eq!(wan_files::detect(&umt5), Some(WanFile::Umt5Transformers));
    let e = wan_files::transformer(&umt5, &path, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("patch_embedding.weight"), "{e}");
    let (path, _, mut keys) = key_list("transformer-1.3B.wan");
    keys.insert("patch_embedding.weight".into(), vec![1000, 16, 1, 2, 2]);
    let e = wan_files::transformer(&keys, &path, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("128") && e.contains("diffusers folder"), "{e}");
}

#[test]
fn wan_2_2_vae_maps_both_ways_with_its_published_config() {
    // wan2.2_vae.safetensors (Wan2.2_VAE.pth's naming): one residual
    // down/up block per level with its own inner list; the config inferred
    // from the shapes is TI2V-5B's diffusers vae/config.json, plus the 48
    // published latent statistics a single file cannot carry.
    let gpu = plan_gpu();
    let (path, _, original) = key_list("vae-2.2.wan");
    let (_, published, diffusers) = key_list("vae-2.2.diffusers");
    assert_eq!(wan_files::detect(&original), Some(WanFile::Vae));
    assert!(wan_files::is_vae_22(&original));
    assert!(!wan_files::is_vae_22(&key_list("vae.wan").2));
    let inferred = wan_files::vae(&original, &path).unwrap();
    assert_config("vae 2.2", &inferred.config, &published);
    assert_eq!(inferred.config["latents_mean"][0], -0.2289);
    assert_eq!(inferred.config["latents_std"][47], 0.7744);
    assert_maps_both_ways("vae 2.2", &original, &diffusers, &inferred.aliases, |k| {
        wan_files::vae22_key_original(k, 2)
    });
    let config = WanVaeConfig::from_value(&path, inferred.config).unwrap();
    assert_eq!(
        (
            config.spatial_scale_factor(),
            config.temporal_scale_factor()
        ),
        (16, 4)
    );
    let set = plan_load(&original, inferred.aliases, |w| {
        AutoencoderKLWan::new(&gpu, w, config)
    });
    assert_eq!(set.unused(), Vec::<String>::new());
}

/// A safetensors file of `keys` (f16) holding its header only: what
/// `identify` reads (the data it lays out is reported missing).
fn header_only(name: &str, keys: &Keys) -> PathBuf {
    let mut offset = 0u64;
    let mut header = serde_json::Map::new();
    for (k, shape) in keys {
        let bytes = 2 * shape.iter().product::<usize>() as u64;
        header.insert(
            k.clone(),
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let text = serde_json::Value::Object(header).to_string();
    let dir = std::env::temp_dir().join(format!("motif-wan-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let mut data = (text.len() as u64).to_le_bytes().to_vec();
    data.extend_from_slice(text.as_bytes());
    std::fs::write(&path, data).unwrap();
    path
}

#[test]
fn identify_names_the_wan_2_2_vae_and_a_ti2v_transformer() {
    use motif_engine::weights::identify::{identify, Role};
    let vae = identify(&header_only(
        "wan2.2_vae.safetensors",
        &key_list("vae-2.2.wan").2,
    ))
    .unwrap()
    .expect("a Wan VAE");
    assert_eq!(vae.variant, "Wan 2.2, 48 latent channels");
    assert!(matches!(
        vae.role,
        Role::Vae {
            latent_channels: Some(48)
        }
    ));
    let vae21 = identify(&header_only(
        "wan_2.1_vae.safetensors",
        &key_list("vae.wan").2,
    ))
    .unwrap()
    .expect("a Wan VAE");
    assert_eq!(vae21.variant, "Wan, 16 latent channels");
    // The TI2V-5B transformer's telling shapes: width 3072, 48 input channels.
    let ti2v: Keys = [
        ("patch_embedding.weight", vec![3072, 48, 1, 2, 2]),
        ("head.modulation", vec![1, 2, 3072]),
        ("text_embedding.0.weight", vec![3072, 4096]),
    ]
    .into_iter()
    .map(|(k, s)| (k.to_string(), s))
    .collect();
    let tr = identify(&header_only("wan2.2_ti2v_5B_fp16.safetensors", &ti2v))
        .unwrap()
        .expect("a Wan transformer");
    assert_eq!(tr.variant, "5B TI2V");
}
