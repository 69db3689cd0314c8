//! Wan single files against the real-size key lists of
//! tools/fixtures/wan_key_lists.py (dumped on the meta device from diffusers'
//! and transformers' classes and from the Wan repository's own, in both
//! namings): every original key maps to the diffusers key of the same shape
//! and back, none is missing or left over, the configs inferred from the
//! shapes equal the published ones, and the models load from the original
//! names on a plan-mode GPU (no weight memory) reading every key. The
//! image-to-video and Wan 2.2 lists (tools/fixtures/wan_i2v_key_lists.py):
//! Wan2.1-I2V-14B, FLF2V-14B, Wan2.2-TI2V-5B, the A14B experts, and CLIP
//! ViT-H/14 as ComfyUI's clip_vision_h.safetensors names it.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::plan_gpu;
use motif_engine::models::clip_vision::{ClipVisionConfig, ClipVisionModel};
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
    transformers_map_both_ways(&["1.3B", "14B"]);
}

#[test]
fn image_to_video_and_wan_2_2_transformers_map_both_ways_with_their_published_configs() {
    transformers_map_both_ways(&["i2v-14B", "flf2v-14B", "ti2v-5B", "a14b-t2v", "a14b-i2v"]);
}

/// Each transformer's original list maps to its diffusers list, with and
/// without ComfyUI's prefix, to the published config, and loads reading
/// every key.
fn transformers_map_both_ways(tags: &[&str]) {
    let gpu = plan_gpu();
    for &tag in tags {
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
fn clip_vision_h_as_comfyui_names_it_maps_with_its_published_config() {
    let gpu = plan_gpu();
    let (path, mut published, keys) = key_list("clip-vision-h.comfy");
    // The projection (CLIP's image embedding) is never read: its width is
    // no part of the inferred config.
    published.as_object_mut().unwrap().remove("projection_dim");
    assert_eq!(wan_files::detect(&keys), Some(WanFile::ClipVision));
    let inferred = wan_files::clip_vision(&keys, &path, None).unwrap();
    assert_config("clip vision h", &inferred.config, &published);
    assert_eq!(inferred.aliases.len(), keys.len(), "keys left unmapped");
    let config = ClipVisionConfig::from_value(&path, inferred.config).unwrap();
    assert_eq!(config.tokens(), 257);
    let set = plan_load(&keys, inferred.aliases, |w| {
        ClipVisionModel::new(&gpu, w, config)
    });
    // Wan reads hidden_states[-2]: the last layer, the final norm and the
    // projection are never read, and nothing else is left.
    let mut unused = set.unused();
    unused.sort();
    let mut expected: Vec<String> = keys
        .keys()
        .filter(|k| {
            k.starts_with("vision_model.encoder.layers.31.")
                || k.starts_with("vision_model.post_layernorm.")
                || k.starts_with("visual_projection.")
        })
        .cloned()
        .collect();
    expected.sort();
    assert_eq!(unused, expected);
    // Without `vision_model.` (transformers 5 saves the tower at the top),
    // the same config.
    let bare: Keys = keys
        .iter()
        .filter(|(k, _)| !k.starts_with("visual_projection."))
        .map(|(k, s)| (k.trim_start_matches("vision_model.").to_string(), s.clone()))
        .collect();
    assert_eq!(wan_files::detect(&bare), Some(WanFile::ClipVision));
    let bare_config = wan_files::clip_vision(&bare, &path, None).unwrap().config;
    assert_config("clip vision h, bare", &bare_config, &published);
}

/// A safetensors header for `keys` (f16, offsets laid out end to end) with
/// no data after it: what `identify` reads of a real-size file.
fn header_only(path: &Path, keys: &Keys) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (k, shape) in keys {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(
            k.clone(),
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let json = serde_json::to_vec(&header).unwrap();
    let mut file = (json.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&json);
    std::fs::write(path, file).unwrap();
}

#[test]
fn identify_names_each_real_size_image_to_video_file_from_its_header() {
    use motif_engine::weights::identify::{identify, Role};
    let dir = std::env::temp_dir().join(format!("motif-identify-i2v-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("transformer-i2v-14B.wan", "14B I2V", Some(1280)),
        ("transformer-flf2v-14B.wan", "14B FLF2V", Some(1280)),
        ("transformer-ti2v-5B.wan", "5B TI2V", None),
        ("transformer-a14b-t2v.wan", "14B T2V", None),
        (
            "transformer-a14b-i2v.wan",
            "14B I2V, A14B expert (no image encoder)",
            None,
        ),
    ];
    for (name, variant, image_dim) in cases {
        let (_, _, keys) = key_list(name);
        let prefixed: Keys = keys
            .iter()
            .map(|(k, s)| (format!("{}{k}", wan_files::WAN_PREFIX), s.clone()))
            .collect();
        for (tag, keys) in [("", &keys), ("prefixed-", &prefixed)] {
            let path = dir.join(format!("{tag}{name}.safetensors"));
            header_only(&path, keys);
            let found = identify(&path).unwrap().expect("identified");
            assert_eq!(found.variant, variant, "{tag}{name}");
            assert!(
                found.missing_bytes > 0,
                "{name}: a header alone is a cut file"
            );
            let Role::Transformer {
                image_dim: d,
                latent_channels,
                ..
            } = found.role
            else {
                panic!("{name}: {:?}", found.role)
            };
            assert_eq!(d, image_dim, "{name}");
            let latents = if name.contains("ti2v") { 48 } else { 16 };
            assert_eq!(latent_channels, latents, "{name}");
        }
    }
    let (_, _, keys) = key_list("clip-vision-h.comfy");
    let path = dir.join("clip_vision_h.safetensors");
    header_only(&path, &keys);
    let found = identify(&path).unwrap().expect("identified");
    assert_eq!(found.variant, "CLIP ViT-H/14");
    assert_eq!(found.role, Role::ImageEncoder { width: 1280 });
    assert_eq!(found.role.flag(), Some("--image-encoder"));
    std::fs::remove_dir_all(&dir).ok();
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

/// `header_only` for `keys` in a temporary folder, as `name`.
fn header_file(name: &str, keys: &Keys) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("motif-wan-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    header_only(&path, keys);
    path
}

#[test]
fn identify_names_the_wan_2_2_vae_and_a_ti2v_transformer() {
    use motif_engine::weights::identify::{identify, Role};
    let vae = identify(&header_file(
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
    let vae21 = identify(&header_file(
        "wan_2.1_vae.safetensors",
        &key_list("vae.wan").2,
    ))
    .unwrap()
    .expect("a Wan VAE");
    assert_eq!(vae21.variant, "Wan, 16 latent channels");
    // The TI2V-5B transformer's telling shapes: width 3072, 48 input and
    // output channels (the head's 192 rows are 48 channels of 1x2x2 patches).
    let ti2v: Keys = [
        ("patch_embedding.weight", vec![3072, 48, 1, 2, 2]),
        ("head.modulation", vec![1, 2, 3072]),
        ("head.head.weight", vec![192, 3072]),
        ("text_embedding.0.weight", vec![3072, 4096]),
    ]
    .into_iter()
    .map(|(k, s)| (k.to_string(), s))
    .collect();
    let tr = identify(&header_file("wan2.2_ti2v_5B_fp16.safetensors", &ti2v))
        .unwrap()
        .expect("a Wan transformer");
    assert_eq!(tr.variant, "5B TI2V");
}
