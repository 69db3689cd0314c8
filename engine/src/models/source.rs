//! Where an AnimateDiff model's parts come from: a diffusers folder (merged
//! motion UNet, or SD UNet + `motion_adapter/`), an `org/name` in the
//! Hugging Face cache, or a single-file SD checkpoint — plus an optional
//! separate motion adapter (`--motion-adapter`: folder, repo id, or file in
//! the original AnimateDiff or diffusers format) and VAE (`--vae`), and
//! LoRAs (`--lora`) fused into the UNet and the text encoder.
//! Opening checks paths and headers only; weights are read when a part is
//! built.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::clip::ClipTextConfig;
use super::unet_motion::{MotionAdapterConfig, UNetConfigFile, UNetMotionConfig};
use super::vae::VaeConfig;
use super::wan_files::WanFiles;
use crate::error::LoadError;
use crate::text::ClipTokenizer;
use crate::weights::config::read_config;
use crate::weights::folder::{component_dir, resolve_model};
use crate::weights::single_file::{self, FileKind, Inferred, KeyShapes};
use crate::weights::wan_files;
use crate::weights::{
    refuse_pickle, safetensors_files, LoraFile, LoraTarget, SafetensorsFile, WeightSet,
};

/// What the user named: `--model`, `--motion-adapter`, `--vae`, `--lora`
/// (for Wan: fused into the transformer).
#[derive(Debug, Clone, Default)]
pub struct ModelSpec {
    pub model: String,
    pub motion_adapter: Option<String>,
    pub vae: Option<String>,
    /// LoRA files with their weights (diffusers' `fuse_lora(lora_scale=…)`),
    /// fused in this order into the UNet and, where a file has text-encoder
    /// modules, the text encoder.
    pub loras: Vec<(String, f32)>,
    /// The text encoder of a single-file Wan transformer (a UMT5 file).
    pub text_encoder: Option<String>,
    /// A diffusers config for a single-file Wan transformer, for what its
    /// shapes cannot tell (see [`WanFiles`]).
    pub transformer_config: Option<String>,
    /// The low-noise expert of a single-file Wan 2.2 A14B transformer
    /// (`--transformer-2`), where it is not found by name beside `model`
    /// (see [`WanFiles`]).
    pub transformer_2: Option<String>,
}

/// A part's weights and config; `origin` names it in messages.
pub struct Part<C> {
    pub weights: Arc<WeightSet>,
    pub config: C,
    pub origin: PathBuf,
}

#[derive(Debug, Clone)]
enum Location {
    Folder(PathBuf),
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct ModelSource {
    model: Location,
    adapter: Option<Location>,
    vae: Option<Location>,
    loras: Vec<(Arc<LoraFile>, f32)>,
    /// Set when the model is a single-file Wan transformer.
    wan: Option<Arc<WanFiles>>,
}

fn layout(path: &Path, message: impl Into<String>) -> LoadError {
    LoadError::Layout {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn locate(spec: &str) -> Result<Location, LoadError> {
    let path = resolve_model(spec)?;
    if path.is_dir() {
        return Ok(Location::Folder(path));
    }
    refuse_pickle(&path)?;
    if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        return Err(layout(
            &path,
            "expected a diffusers model folder or a `.safetensors` file",
        ));
    }
    Ok(Location::File(path))
}

pub(crate) fn file_keys(path: &Path) -> Result<KeyShapes, LoadError> {
    let file = SafetensorsFile::open(path)?;
    Ok(file
        .names()
        .filter_map(|k| Some((k.to_string(), file.info(k)?.shape.clone())))
        .collect())
}

fn from_json<C: serde::de::DeserializeOwned>(
    path: &Path,
    value: serde_json::Value,
) -> Result<C, LoadError> {
    serde_json::from_value(value).map_err(|e| LoadError::Config {
        path: path.to_path_buf(),
        message: format!("inferred config: {e}"),
    })
}

fn open_with(
    paths: &[PathBuf],
    aliases: HashMap<String, String>,
) -> Result<Arc<WeightSet>, LoadError> {
    Ok(Arc::new(WeightSet::open(paths)?.with_aliases(aliases)))
}

/// Opens the LoRA files (checking each one's format) with their weights.
fn open_loras(loras: &[(String, f32)]) -> Result<Vec<(Arc<LoraFile>, f32)>, LoadError> {
    loras
        .iter()
        .map(|(path, weight)| Ok((Arc::new(LoraFile::open(Path::new(path))?), *weight)))
        .collect()
}

impl ModelSource {
    /// Resolves the paths and checks what kind of file each one is.
    pub fn open(spec: &ModelSpec) -> Result<Self, LoadError> {
        let model = locate(&spec.model)?;
        let mut wan = None;
        if let Location::File(path) = &model {
            let keys = file_keys(path)?;
            if let Some(kind) = wan_files::detect(&keys) {
                wan = Some(Arc::new(WanFiles::open(path, kind, spec)?));
            } else {
                match single_file::detect(&keys) {
                FileKind::LdmStableDiffusion => {}
                FileKind::MotionModule => {
                    return Err(layout(
                        path,
                        "this is an AnimateDiff motion module, not a model: pass it as --motion-adapter beside an SD1.5 --model",
                    ))
                }
                FileKind::LdmVae | FileKind::DiffusersVae => {
                    return Err(layout(path, "this is a VAE alone: pass it as --vae beside a --model"))
                }
                FileKind::DiffusersUNet | FileKind::Unknown => {
                    return Err(layout(
                        path,
                        "not a Stable Diffusion checkpoint with original (LDM) key names (no `model.diffusion_model.*`) \
                         nor a Wan transformer; pass a diffusers model folder instead",
                    ))
                }
            }
            }
        }
        if let (Some(te), None) = (&spec.text_encoder, &wan) {
            return Err(layout(
                Path::new(te),
                "--text-encoder is taken beside a single-file Wan transformer --model only",
            ));
        }
        let adapter = spec.motion_adapter.as_deref().map(locate).transpose()?;
        let vae = spec.vae.as_deref().map(locate).transpose()?;
        let source = ModelSource {
            model,
            adapter,
            vae,
            loras: open_loras(&spec.loras)?,
            wan,
        };
        source.check_loras()?;
        Ok(source)
    }

    /// The same model with `loras` (file, weight) in place of its LoRAs.
    pub fn with_loras(&self, loras: &[(String, f32)]) -> Result<Self, LoadError> {
        let source = ModelSource {
            loras: open_loras(loras)?,
            ..self.clone()
        };
        source.check_loras()?;
        Ok(source)
    }

    /// Refuses, from the headers alone, a LoRA of another family than the
    /// model's, and for a Wan model one that does not fit its transformer
    /// (a module that matches nothing, another model size): nothing has
    /// been read or put on a GPU yet.
    fn check_loras(&self) -> Result<(), LoadError> {
        if self.loras.is_empty() {
            return Ok(());
        }
        if let Some(files) = &self.wan {
            files.transformer_with_loras(&self.loras)?;
            return Ok(());
        }
        let wan_folder = self.pipeline_class()?.as_deref() == Some("WanPipeline");
        if let (true, Location::Folder(dir)) = (wan_folder, &self.model) {
            let transformer = dir.join("transformer");
            if transformer.is_dir() {
                WeightSet::open_dir(&transformer)?
                    .with_loras(&self.loras, LoraTarget::Transformer)?;
            }
            return Ok(());
        }
        for (lora, _) in &self.loras {
            lora.check_family(LoraTarget::Unet)?;
        }
        Ok(())
    }

    /// `set` with this source's LoRAs fused into the `target` weights
    /// (checked against the set's keys and shapes, nothing read yet).
    pub(crate) fn fuse_loras(
        &self,
        set: WeightSet,
        target: LoraTarget,
    ) -> Result<Arc<WeightSet>, LoadError> {
        Ok(Arc::new(set.with_loras(&self.loras, target)?))
    }

    /// A folder path (no adapter, no VAE override).
    pub fn folder(dir: &Path) -> Self {
        ModelSource {
            model: Location::Folder(dir.to_path_buf()),
            adapter: None,
            vae: None,
            loras: Vec::new(),
            wan: None,
        }
    }

    /// The files of a single-file Wan model, if this is one.
    pub fn wan_files(&self) -> Option<&WanFiles> {
        self.wan.as_deref()
    }

    pub fn path(&self) -> &Path {
        match &self.model {
            Location::Folder(p) | Location::File(p) => p,
        }
    }

    /// The diffusers pipeline class of a model folder (`_class_name` in its
    /// `model_index.json`: `AnimateDiffPipeline`, `WanPipeline`, …), which
    /// says which family runs it; `WanPipeline` for a single-file Wan
    /// transformer; `None` for other single files and folders without a
    /// model_index.json.
    pub fn pipeline_class(&self) -> Result<Option<String>, LoadError> {
        if self.wan.is_some() {
            return Ok(Some("WanPipeline".into()));
        }
        let Location::Folder(dir) = &self.model else {
            return Ok(None);
        };
        let index = dir.join("model_index.json");
        if !index.is_file() {
            return Ok(None);
        }
        #[derive(serde::Deserialize)]
        struct ModelIndex {
            #[serde(rename = "_class_name")]
            class_name: Option<String>,
        }
        let parsed: ModelIndex = read_config(&index)?;
        Ok(parsed.class_name)
    }

    /// The opened LoRA files with their weights, for loaders that fuse them.
    pub(crate) fn lora_files(&self) -> &[(Arc<LoraFile>, f32)] {
        &self.loras
    }

    /// The LoRA files fused into this model, with their weights.
    pub fn loras(&self) -> impl Iterator<Item = (&LoraFile, f32)> {
        self.loras.iter().map(|(f, w)| (f.as_ref(), *w))
    }

    pub fn is_single_file(&self) -> bool {
        matches!(self.model, Location::File(_))
    }

    /// The model's tokenizer, or SD1.x's CLIP vocabulary for single files.
    pub fn tokenizer(&self) -> Result<ClipTokenizer, LoadError> {
        match &self.model {
            Location::Folder(dir) => ClipTokenizer::from_dir(&component_dir(dir, "tokenizer")?),
            Location::File(_) => ClipTokenizer::bundled(),
        }
    }

    /// `scheduler/scheduler_config.json` of a folder; `None` for single files
    /// (the caller's default applies).
    pub fn scheduler_config(&self) -> Option<PathBuf> {
        match &self.model {
            Location::Folder(dir) => {
                let p = dir.join("scheduler").join("scheduler_config.json");
                p.is_file().then_some(p)
            }
            Location::File(_) => None,
        }
    }

    pub fn text_encoder(&self) -> Result<Part<ClipTextConfig>, LoadError> {
        match &self.model {
            Location::Folder(dir) => {
                let dir = component_dir(dir, "text_encoder")?;
                let path = dir.join("config.json");
                Ok(Part {
                    config: ClipTextConfig::load(&path)?,
                    weights: self
                        .fuse_loras(WeightSet::open_dir(&dir)?, LoraTarget::TextEncoder)?,
                    origin: dir,
                })
            }
            Location::File(file) => {
                let Inferred { config, aliases } = single_file::ldm_clip(&file_keys(file)?, file)?;
                let set = WeightSet::open(std::slice::from_ref(file))?.with_aliases(aliases);
                Ok(Part {
                    config: ClipTextConfig::load_value(file, config)?,
                    weights: self.fuse_loras(set, LoraTarget::TextEncoder)?,
                    origin: file.clone(),
                })
            }
        }
    }

    pub fn vae(&self) -> Result<Part<VaeConfig>, LoadError> {
        let (location, from_model) = match &self.vae {
            Some(l) => (l, false),
            None => (&self.model, true),
        };
        match location {
            Location::Folder(dir) => {
                let dir = if from_model || !dir.join("config.json").is_file() {
                    component_dir(dir, "vae")?
                } else {
                    dir.clone()
                };
                let path = dir.join("config.json");
                Ok(Part {
                    config: VaeConfig::load(&path)?,
                    weights: Arc::new(WeightSet::open_dir(&dir)?),
                    origin: dir,
                })
            }
            Location::File(file) => {
                let keys = file_keys(file)?;
                let Inferred { config, aliases } = match single_file::detect(&keys) {
                    FileKind::LdmStableDiffusion => {
                        if !keys
                            .keys()
                            .any(|k| k.starts_with(single_file::LDM_VAE_PREFIX))
                        {
                            return Err(layout(
                                file,
                                "this checkpoint has no VAE inside (`first_stage_model.*`): pass one with --vae FILE",
                            ));
                        }
                        single_file::ldm_vae(&keys, single_file::LDM_VAE_PREFIX, file)?
                    }
                    FileKind::LdmVae => single_file::ldm_vae(&keys, "", file)?,
                    FileKind::DiffusersVae => single_file::diffusers_vae(&keys, file)?,
                    _ => {
                        return Err(layout(
                            file,
                            "not a VAE: expected `encoder.down…` or `encoder.down_blocks…` keys",
                        ))
                    }
                };
                Ok(Part {
                    config: VaeConfig::from_value(file, config)?,
                    weights: open_with(std::slice::from_ref(file), aliases)?,
                    origin: file.clone(),
                })
            }
        }
    }

    /// The motion UNet: a merged `UNetMotionModel`, or an SD UNet plus the
    /// motion adapter (the model folder's `motion_adapter/`, or the
    /// `--motion-adapter` given).
    pub fn unet(&self) -> Result<Part<UNetMotionConfig>, LoadError> {
        let (unet_path, unet_cfg, mut files, mut aliases) = match &self.model {
            Location::Folder(dir) => {
                let udir = component_dir(dir, "unet")?;
                let path = udir.join("config.json");
                let cfg: UNetConfigFile = read_config(&path)?;
                (path, cfg, safetensors_files(&udir)?, HashMap::new())
            }
            Location::File(file) => {
                let Inferred { config, aliases } = single_file::ldm_unet(&file_keys(file)?, file)?;
                (
                    file.clone(),
                    from_json(file, config)?,
                    vec![file.clone()],
                    aliases,
                )
            }
        };
        let merged = unet_cfg.class_name.as_deref() == Some("UNetMotionModel");
        let adapter_location = match (&self.adapter, &self.model) {
            (Some(_), _) if merged => {
                return Err(layout(
                    &unet_path,
                    "this UNet already holds motion modules (UNetMotionModel): drop --motion-adapter",
                ))
            }
            (Some(l), _) => Some(l.clone()),
            (None, Location::Folder(dir)) if !merged => {
                let d = dir.join("motion_adapter");
                if d.is_dir() {
                    Some(Location::Folder(d))
                } else {
                    return Err(layout(
                        dir,
                        "the UNet has no motion modules and there is no `motion_adapter/` folder: pass --motion-adapter DIR|FILE",
                    ));
                }
            }
            (None, Location::File(file)) => {
                return Err(layout(
                    file,
                    "a Stable Diffusion checkpoint without motion modules: pass an AnimateDiff motion module with --motion-adapter",
                ))
            }
            (None, _) => None,
        };
        let adapter: Option<(PathBuf, MotionAdapterConfig)> = match adapter_location {
            None => None,
            Some(Location::Folder(dir)) => {
                let path = dir.join("config.json");
                let cfg: MotionAdapterConfig = read_config(&path)?;
                files.extend(safetensors_files(&dir)?);
                Some((path, cfg))
            }
            Some(Location::File(file)) => {
                let keys = file_keys(&file)?;
                if single_file::detect(&keys) != FileKind::MotionModule {
                    return Err(layout(
                        &file,
                        "not an AnimateDiff motion module: expected `down_blocks.N.motion_modules.…` keys",
                    ));
                }
                let inferred = single_file::motion_module(&keys, &file)?;
                aliases.extend(inferred.aliases);
                files.push(file.clone());
                Some((file.clone(), from_json(&file, inferred.config)?))
            }
        };
        let config = UNetMotionConfig::resolve(
            &unet_path,
            &unet_cfg,
            adapter.as_ref().map(|(p, c)| (p.as_path(), c)),
        )?;
        Ok(Part {
            weights: self.fuse_loras(
                WeightSet::open(&files)?.with_aliases(aliases),
                LoraTarget::Unet,
            )?,
            config,
            origin: unet_path,
        })
    }
}
