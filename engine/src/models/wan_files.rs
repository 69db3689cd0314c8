//! A Wan model from single files, as ComfyUI users keep it: the diffusion
//! transformer (`--model`, e.g. `diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors`),
//! the UMT5 text encoder (`--text-encoder`, `text_encoders/umt5_xxl_fp16.safetensors`,
//! its SentencePiece tokenizer inside) and the VAE (`--vae`,
//! `vae/wan_2.1_vae.safetensors`), and for image-to-video the CLIP vision
//! encoder (`--image-encoder`, `clip_vision/clip_vision_h.safetensors`).
//! Opening checks that each file is what
//! its flag takes, from the header alone; weights are read when a part is
//! built. Key maps and configs come from `weights::wan_files`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::clip_vision::ClipVisionConfig;
use super::source::{file_keys, ModelSpec, Part};
use super::umt5::UMT5Config;
use super::wan_transformer::WanTransformerConfig;
use super::wan_vae::WanVaeConfig;
use crate::error::LoadError;
use crate::text::Umt5Tokenizer;
use crate::weights::config::read_config;
use crate::weights::single_file::Inferred;
use crate::weights::wan_files::{self, WanFile};
use crate::weights::{FileDType, LoraFile, LoraTarget, SafetensorsFile, WeightSet};

/// The tensor ComfyUI's UMT5 files keep their SentencePiece model in.
const SPIECE_TENSOR: &str = "spiece_model";

/// The three files of a single-file Wan model.
#[derive(Debug, Clone)]
pub struct WanFiles {
    pub transformer: PathBuf,
    pub text_encoder: PathBuf,
    pub vae: PathBuf,
    /// A diffusers `config.json` for the transformer (or its folder): what
    /// the shapes cannot tell (the head count of models whose heads are not
    /// Wan's 128 wide: the reference cases' tiny ones).
    pub transformer_config: Option<PathBuf>,
    /// Wan 2.2 A14B: the low-noise expert beside `transformer` (the
    /// high-noise one), found by name or given (see [`second_expert`]).
    pub transformer_2: Option<PathBuf>,
    /// The CLIP vision encoder of an image-to-video transformer.
    pub image_encoder: Option<PathBuf>,
    /// A `CLIPVisionConfig` (file or folder) for what the image encoder's
    /// shapes cannot tell (the head count of one that is not ViT-H).
    pub image_encoder_config: Option<PathBuf>,
}

/// A config file named as itself or as the folder holding `config.json`.
fn config_file(p: &Path) -> PathBuf {
    match p.is_dir() {
        true => p.join("config.json"),
        false => p.to_path_buf(),
    }
}

/// The low-noise expert of a Wan 2.2 A14B `--model` file: `given`
/// (`--transformer-2`), else, for a file named as ComfyUI's are
/// (`wan2.2_t2v_high_noise_14B_fp16.safetensors`), the file of the same
/// name with `low_noise` beside it. A low-noise file given as the model is
/// refused (the high-noise expert runs first), and a high-noise file
/// without its pair names the file it looked for.
pub fn second_expert(model: &Path, given: Option<&str>) -> Result<Option<PathBuf>, LoadError> {
    let name = model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.contains("low_noise") {
        return Err(layout(
            model,
            "this is the low-noise expert of a Wan 2.2 A14B pair: pass the high-noise file \
             (…high_noise…) as --model; the low-noise one is found beside it by name, or given \
             with --transformer-2 FILE",
        ));
    }
    if let Some(given) = given {
        let path = PathBuf::from(given);
        if !path.is_file() {
            return Err(LoadError::Io {
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "--transformer-2: no such file",
                ),
            });
        }
        expect_kind(
            &path,
            "--transformer-2",
            &[WanFile::Transformer],
            "a Wan transformer (the low-noise expert)",
        )?;
        return Ok(Some(path));
    }
    if !name.contains("high_noise") {
        return Ok(None);
    }
    let pair = model.with_file_name(name.replacen("high_noise", "low_noise", 1));
    match pair.is_file() {
        true => Ok(Some(pair)),
        false => Err(layout(
            model,
            format!(
                "this is the high-noise expert of a Wan 2.2 A14B pair, but its low-noise expert \
                 {} is not beside it: put it there or pass it with --transformer-2 FILE",
                pair.display()
            ),
        )),
    }
}

fn layout(path: &Path, message: impl Into<String>) -> LoadError {
    LoadError::Layout {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// A `.safetensors` file named by a flag, or an error naming the flag.
fn given_file(
    spec: Option<&str>,
    model: &Path,
    flag: &str,
    needs: &str,
) -> Result<PathBuf, LoadError> {
    let Some(spec) = spec else {
        return Err(layout(
            model,
            format!("a Wan transformer file holds no {needs}: pass one with {flag} FILE"),
        ));
    };
    let path = PathBuf::from(spec);
    if !path.is_file() {
        return Err(LoadError::Io {
            path,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{flag}: no such file"),
            ),
        });
    }
    Ok(path)
}

/// Fails unless `path`'s keys are a `want` file, naming the flag it belongs to.
fn expect_kind(path: &Path, flag: &str, want: &[WanFile], what: &str) -> Result<(), LoadError> {
    let found = wan_files::detect(&file_keys(path)?);
    match found {
        Some(kind) if want.contains(&kind) => Ok(()),
        Some(kind) => Err(layout(
            path,
            format!(
                "given as {flag}, but this is {}: pass it as {} and give {what} with {flag}",
                kind.describe(),
                kind.flag()
            ),
        )),
        None => Err(layout(
            path,
            format!("given as {flag}, but this is not {what} (its key names are not Wan's)"),
        )),
    }
}

impl WanFiles {
    /// The files of a Wan transformer `--model` file: `--text-encoder` and
    /// `--vae` must name a UMT5 file and a Wan VAE file.
    pub fn open(model: &Path, kind: WanFile, spec: &ModelSpec) -> Result<Self, LoadError> {
        if kind != WanFile::Transformer {
            return Err(layout(
                model,
                format!(
                    "this is {}, not a model: pass it as {} beside a Wan transformer --model FILE",
                    kind.describe(),
                    kind.flag()
                ),
            ));
        }
        if spec.motion_adapter.is_some() {
            return Err(layout(
                model,
                "a Wan transformer takes no --motion-adapter (AnimateDiff's)",
            ));
        }
        let text_encoder = given_file(
            spec.text_encoder.as_deref(),
            model,
            "--text-encoder",
            "text encoder (UMT5, e.g. ComfyUI's text_encoders/umt5_xxl_fp16.safetensors)",
        )?;
        let vae = given_file(
            spec.vae.as_deref(),
            model,
            "--vae",
            "VAE (e.g. ComfyUI's vae/wan_2.1_vae.safetensors)",
        )?;
        expect_kind(
            &text_encoder,
            "--text-encoder",
            &[WanFile::Umt5Transformers, WanFile::Umt5Wan],
            "a UMT5 text encoder",
        )?;
        expect_kind(&vae, "--vae", &[WanFile::Vae], "a Wan 2.1 VAE")?;
        let image_encoder = match spec.image_encoder.as_deref() {
            None => None,
            given => Some(given_file(
                given,
                model,
                "--image-encoder",
                "image encoder (CLIP vision, e.g. ComfyUI's clip_vision/clip_vision_h.safetensors)",
            )?),
        };
        if let Some(path) = &image_encoder {
            expect_kind(
                path,
                "--image-encoder",
                &[WanFile::ClipVision],
                "a CLIP vision image encoder",
            )?;
        }
        let files = WanFiles {
            transformer: model.to_path_buf(),
            text_encoder,
            vae,
            transformer_config: spec.transformer_config.as_ref().map(PathBuf::from),
            transformer_2: second_expert(model, spec.transformer_2.as_deref())?,
            image_encoder,
            image_encoder_config: spec.image_encoder_config.as_ref().map(PathBuf::from),
        };
        files.check()?;
        Ok(files)
    }

    /// The parts fit together (from the headers alone, before any weight
    /// is read): the text encoder's width is the transformer's text_dim,
    /// the VAE's latent channels its out_channels, the image encoder is
    /// there exactly when the transformer reads images, as wide as its
    /// image_dim; and the tokenizer reads.
    fn check(&self) -> Result<(), LoadError> {
        // What the files themselves hold first (fp8 scales, the tokenizer),
        // then how the parts fit.
        let files = [&self.transformer, &self.text_encoder, &self.vae];
        for path in files
            .into_iter()
            .chain(&self.transformer_2)
            .chain(&self.image_encoder)
        {
            crate::weights::dtype::check_scales(&SafetensorsFile::open(path)?)?;
        }
        self.tokenizer()?;
        self.check_image_encoder()?;
        let transformer = self.transformer()?.config;
        let text_encoder = self.text_encoder()?.config;
        let vae = self.vae()?.config;
        if text_encoder.d_model != transformer.text_dim {
            return Err(layout(
                &self.text_encoder,
                format!(
                    "this text encoder is {} wide, but the transformer {} takes {}-wide text \
                     (UMT5-XXL: 4096): pass the text encoder made for it",
                    text_encoder.d_model,
                    self.transformer.display(),
                    transformer.text_dim
                ),
            ));
        }
        // The transformer predicts the VAE's latents; an image-to-video
        // one takes more channels than it predicts (the frame mask and the
        // encoded still beside the noise).
        if vae.z_dim != transformer.out_channels() {
            return Err(layout(
                &self.vae,
                format!(
                    "this VAE has {} latent channels, but the transformer {} makes {}: pass the \
                     {}",
                    vae.z_dim,
                    self.transformer.display(),
                    transformer.out_channels(),
                    match transformer.out_channels() {
                        48 => "Wan 2.2 VAE (wan2.2_vae.safetensors)",
                        _ => "Wan 2.1 VAE (wan_2.1_vae.safetensors)",
                    }
                ),
            ));
        }
        Ok(())
    }

    /// An image encoder exactly when the transformer has an image embedder
    /// (Wan2.1-I2V, FLF2V), as wide as its image_dim, with as many tokens
    /// per image as a first-last-frame `pos_embed` spans for two.
    /// Read from the headers before the transformer's config, so that a
    /// missing image encoder is named first.
    fn check_image_encoder(&self) -> Result<(), LoadError> {
        let branch = wan_files::image_branch(&file_keys(&self.transformer)?);
        let (image_dim, positions, path) = match (branch, &self.image_encoder) {
            (None, None) => return Ok(()),
            (Some((d, _)), None) => {
                return Err(layout(
                    &self.transformer,
                    format!(
                        "this is an image-to-video Wan transformer (an image embedder `img_emb`, \
                         image_dim {d}): it needs its CLIP vision image encoder, and none was \
                         given (--image-encoder): pass ComfyUI's clip_vision_h.safetensors with \
                         --image-encoder FILE, or put it in the models folder's clip_vision/"
                    ),
                ))
            }
            (None, Some(path)) => {
                return Err(layout(
                    path,
                    format!(
                        "given as --image-encoder, but the transformer {} has no image embedder \
                         (`img_emb`): it takes no image encoder; leave --image-encoder out",
                        self.transformer.display()
                    ),
                ))
            }
            (Some((d, positions)), Some(path)) => (d, positions, path),
        };
        // Width and tokens from the shapes first: a mismatch is named
        // before what else the config needs (the head count).
        let Some((d, tokens)) = wan_files::clip_vision_size(&file_keys(path)?) else {
            return Err(layout(
                path,
                "given as --image-encoder, but it has no CLIP patch and position embeddings",
            ));
        };
        if d != image_dim {
            return Err(layout(
                path,
                format!(
                    "this image encoder is {d} wide, but the transformer {} reads {}-wide image \
                     tokens (CLIP ViT-H/14: 1280): pass the image encoder made for it \
                     (clip_vision_h.safetensors)",
                    self.transformer.display(),
                    image_dim
                ),
            ));
        }
        if let Some(p) = positions {
            if p != 2 * tokens {
                return Err(layout(
                    path,
                    format!(
                        "this image encoder gives {tokens} tokens per image, but the first-last-frame \
                         transformer {} has positions for {p}, two images of {}",
                        self.transformer.display(),
                        p / 2
                    ),
                ));
            }
        }
        self.image_encoder()?;
        Ok(())
    }

    /// The CLIP vision encoder with its inferred config, if the model has
    /// one.
    pub fn image_encoder(&self) -> Result<Option<Part<ClipVisionConfig>>, LoadError> {
        let Some(path) = &self.image_encoder else {
            return Ok(None);
        };
        let given = match &self.image_encoder_config {
            Some(p) => Some(read_config::<serde_json::Value>(&config_file(p))?),
            None => None,
        };
        let Inferred { config, aliases } =
            wan_files::clip_vision(&file_keys(path)?, path, given.as_ref())?;
        Ok(Some(Part {
            config: ClipVisionConfig::from_value(path, config)?,
            weights: Self::weights(path, aliases)?,
            origin: path.clone(),
        }))
    }

    fn weights(path: &Path, aliases: HashMap<String, String>) -> Result<Arc<WeightSet>, LoadError> {
        Ok(Arc::new(
            WeightSet::open(&[path.to_path_buf()])?.with_aliases(aliases),
        ))
    }

    /// The transformer with its inferred config. With `transformer_config`
    /// given, its head count is taken and every other field must equal
    /// what the shapes say.
    pub fn transformer(&self) -> Result<Part<WanTransformerConfig>, LoadError> {
        self.transformer_with_loras(&[])
    }

    /// The low-noise expert of a Wan 2.2 A14B pair, its config inferred
    /// as the first's.
    pub fn transformer_2(&self) -> Result<Option<Part<WanTransformerConfig>>, LoadError> {
        self.transformer_2
            .as_ref()
            .map(|path| self.transformer_at(path, &[]))
            .transpose()
    }

    /// [`WanFiles::transformer`] with LoRAs (file, user weight) fused in.
    pub fn transformer_with_loras(
        &self,
        loras: &[(Arc<LoraFile>, f32)],
    ) -> Result<Part<WanTransformerConfig>, LoadError> {
        self.transformer_at(&self.transformer, loras)
    }

    fn transformer_at(
        &self,
        path: &Path,
        loras: &[(Arc<LoraFile>, f32)],
    ) -> Result<Part<WanTransformerConfig>, LoadError> {
        let keys = file_keys(path)?;
        let given = match &self.transformer_config {
            None => None,
            Some(p) => {
                let p = config_file(p);
                let value: serde_json::Value = read_config(&p)?;
                Some((p, value))
            }
        };
        let heads = given
            .as_ref()
            .and_then(|(_, v)| v.get("num_attention_heads")?.as_u64())
            .map(|h| h as usize);
        let Inferred { config, aliases } = wan_files::transformer(&keys, path, heads)?;
        if let Some((config_path, value)) = &given {
            for (field, inferred) in config.as_object().into_iter().flatten() {
                let stated = value.get(field).unwrap_or(&serde_json::Value::Null);
                let same = match (stated.as_f64(), inferred.as_f64()) {
                    (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                    _ => stated == inferred,
                };
                if field != "_class_name" && !same {
                    return Err(LoadError::Config {
                        path: config_path.clone(),
                        message: format!(
                            "`{field}` is {stated}, but {} has {inferred} by its tensor shapes",
                            path.display()
                        ),
                    });
                }
            }
        }
        Ok(Part {
            config: WanTransformerConfig::from_value(path, config)?,
            weights: Arc::new(
                WeightSet::open(&[path.to_path_buf()])?
                    .with_aliases(aliases)
                    .with_loras(loras, LoraTarget::Transformer)?,
            ),
            origin: path.to_path_buf(),
        })
    }

    pub fn text_encoder(&self) -> Result<Part<UMT5Config>, LoadError> {
        let path = &self.text_encoder;
        let Inferred { config, aliases } = wan_files::umt5(&file_keys(path)?, path)?;
        Ok(Part {
            config: UMT5Config::from_value(path, config)?,
            weights: Self::weights(path, aliases)?,
            origin: path.clone(),
        })
    }

    pub fn vae(&self) -> Result<Part<WanVaeConfig>, LoadError> {
        let path = &self.vae;
        let Inferred { config, aliases } = wan_files::vae(&file_keys(path)?, path)?;
        Ok(Part {
            config: WanVaeConfig::from_value(path, config)?,
            weights: Self::weights(path, aliases)?,
            origin: path.clone(),
        })
    }

    /// The text encoder's tokenizer: the SentencePiece model stored in the
    /// file as the `spiece_model` byte tensor (ComfyUI's UMT5 files), else a
    /// `tokenizer.json` or `spiece.model` beside the file.
    pub fn tokenizer(&self) -> Result<Umt5Tokenizer, LoadError> {
        let path = &self.text_encoder;
        let file = SafetensorsFile::open(path)?;
        if let Some(info) = file.info(SPIECE_TENSOR) {
            if info.dtype != FileDType::U8 {
                return Err(LoadError::UnsupportedDType {
                    path: path.clone(),
                    key: SPIECE_TENSOR.into(),
                    dtype: format!(
                        "{:?} where U8 (the SentencePiece model's bytes) was expected",
                        info.dtype
                    ),
                });
            }
            // A tensor that does not parse is a damaged file: no other
            // tokenizer is taken in its place (a different vocabulary would
            // silently change every prompt).
            return Umt5Tokenizer::from_sentencepiece(file.bytes(SPIECE_TENSOR)?, path).map_err(
                |e| match e {
                    LoadError::Config { path, message } => LoadError::Config {
                        path,
                        message: format!(
                            "its `{SPIECE_TENSOR}` tensor (the tokenizer) is damaged: {message}; \
                             download the text encoder again (e.g. ComfyUI's \
                             text_encoders/umt5_xxl_fp16.safetensors)"
                        ),
                    },
                    other => other,
                },
            );
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        if dir.join("tokenizer.json").is_file() || dir.join("spiece.model").is_file() {
            return Umt5Tokenizer::from_dir(dir);
        }
        Err(layout(
            path,
            "this UMT5 file carries no tokenizer (no `spiece_model` tensor) and there is no \
             tokenizer.json or spiece.model beside it: put UMT5's spiece.model next to the file",
        ))
    }
}
