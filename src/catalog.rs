//! What Motif can offer by name: style presets (`assets/styles.json`, built
//! in) and models (`motif models`): the bundled default (built into the
//! binary, unpacked into the cache folder on first use), the models folder
//! (`MOTIF_MODELS`, else the user's data directory) and the Hugging Face
//! cache.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};

use crate::bundled;
use motif_engine::pipelines::family_for_class;
use motif_engine::weights::identify::{self, FolderFile, Identified, Role};
use serde_json::Value;

const STYLES: &str = include_str!("../assets/styles.json");

pub struct Style {
    pub name: String,
    pub description: String,
    pub prompt: String,
    pub negative: String,
}

fn styles_json() -> Result<serde_json::Map<String, Value>> {
    match serde_json::from_str::<Value>(STYLES) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(anyhow!(
            "the built-in assets/styles.json is not a JSON object of styles"
        )),
    }
}

pub fn styles() -> Result<Vec<Style>> {
    let map = styles_json()?;
    map.iter()
        .map(|(name, v)| {
            let field = |k: &str| {
                v.get(k)
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("style `{name}` has no string `{k}`"))
            };
            let prompt = field("prompt")?;
            if !prompt.contains("{prompt}") {
                return Err(anyhow!(
                    "style `{name}`: its prompt template lacks {{prompt}}"
                ));
            }
            Ok(Style {
                name: name.clone(),
                description: field("description")?,
                prompt,
                negative: field("negative")?,
            })
        })
        .collect()
}

pub fn style(name: &str) -> Result<Style> {
    let all = styles()?;
    let names: Vec<String> = all.iter().map(|s| s.name.clone()).collect();
    all.into_iter().find(|s| s.name == name).ok_or_else(|| {
        anyhow!(
            "unknown style `{name}` (known: {}; see `motif styles`)",
            names.join(", ")
        )
    })
}

/// The models folder: `MOTIF_MODELS`, else `$XDG_DATA_HOME/motif/models`,
/// else `~/.local/share/motif/models` (`%APPDATA%\motif\models` on Windows).
pub fn models_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MOTIF_MODELS").filter(|s| !s.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("XDG_DATA_HOME").filter(|s| !s.is_empty()) {
        return Some(PathBuf::from(p).join("motif").join("models"));
    }
    if let Some(p) = std::env::var_os("APPDATA").filter(|s| !s.is_empty()) {
        return Some(PathBuf::from(p).join("motif").join("models"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share/motif/models"))
}

/// A `--model` value: an existing path, a name in the models folder (a
/// folder, or a file of its ComfyUI subfolders by name), `default` (the
/// bundled model, unpacked on first use), or (left as is) an org/name for
/// the Hugging Face cache.
pub fn resolve_model_name(spec: &str) -> Result<String> {
    if Path::new(spec).exists() {
        return Ok(spec.to_string());
    }
    if let Some(dir) = models_dir() {
        let candidate = dir.join(spec);
        if candidate.exists() {
            return Ok(candidate.to_string_lossy().into_owned());
        }
    }
    if spec == "default" {
        return Ok(bundled::folder()?.to_string_lossy().into_owned());
    }
    let files = folder_files();
    if let Some(path) = resolve_in(&files, Flag::Model, spec)? {
        return Ok(path.to_string_lossy().into_owned());
    }
    // An org/name goes on to the Hugging Face cache; a bare name (or one
    // under a ComfyUI subfolder) was meant for the models folder.
    if !spec.contains('/') || names_subfolder(spec) {
        return Err(unknown(Flag::Model, spec, &files));
    }
    Ok(spec.to_string())
}

/// The flags that take a file by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    Model,
    /// The low-noise expert of a single-file Wan 2.2 A14B model: a
    /// transformer file, as `--model`.
    Transformer2,
    TextEncoder,
    Vae,
    Lora,
    MotionAdapter,
}

impl Flag {
    pub fn name(self) -> &'static str {
        match self {
            Flag::Model => "--model",
            Flag::Transformer2 => "--transformer-2",
            Flag::TextEncoder => "--text-encoder",
            Flag::Vae => "--vae",
            Flag::Lora => "--lora",
            Flag::MotionAdapter => "--motion-adapter",
        }
    }

    fn takes(self, file: &FolderFile) -> bool {
        let role = match &file.identified {
            Ok(Some(i)) => i.role,
            _ => return false,
        };
        let flag = match self {
            Flag::Transformer2 => Flag::Model,
            other => other,
        };
        role.flag() == Some(flag.name())
    }
}

/// The ComfyUI-style files of the models folder (none without one).
pub fn folder_files() -> Vec<FolderFile> {
    models_dir()
        .map(|d| identify::comfy_files(&d))
        .unwrap_or_default()
}

/// Whether `spec` starts with one of ComfyUI's subfolder names.
fn names_subfolder(spec: &str) -> bool {
    spec.split_once('/')
        .is_some_and(|(head, _)| identify::COMFY_FOLDERS.contains(&head))
}

/// The file `spec` names among `files`: its name under the models folder
/// (`loras/wan/x`) or its file name alone (`x`), with or without
/// `.safetensors`. Of several, those `flag` takes; still several: an
/// error listing them. `None` when no file has that name.
pub fn resolve_in(files: &[FolderFile], flag: Flag, spec: &str) -> Result<Option<PathBuf>> {
    let bare = spec.strip_suffix(".safetensors").unwrap_or(spec);
    let mut matches: Vec<&FolderFile> = files
        .iter()
        .filter(|f| f.name == bare || f.stem == bare)
        .collect();
    if matches.len() > 1 {
        let fitting: Vec<&FolderFile> = matches.iter().copied().filter(|f| flag.takes(f)).collect();
        if !fitting.is_empty() {
            matches = fitting;
        }
    }
    match matches[..] {
        [] => Ok(None),
        [one] => Ok(Some(one.path.clone())),
        _ => Err(anyhow!(
            "names {} files in the models folder: pass one of {}",
            matches.len(),
            matches
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Levenshtein distance, on characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// How many candidates an unknown name's error lists.
const NEAR_CANDIDATES: usize = 5;

/// An unknown name: the error lists the files `flag` takes that are
/// nearest to it (by edit distance on lower-cased names), else says the
/// folder has none.
fn unknown(flag: Flag, spec: &str, files: &[FolderFile]) -> anyhow::Error {
    let folder = models_dir().map_or("no models folder".into(), |d| d.display().to_string());
    let wanted = spec
        .strip_suffix(".safetensors")
        .unwrap_or(spec)
        .to_lowercase();
    let mut near: Vec<(usize, &str)> = files
        .iter()
        .filter(|f| flag.takes(f))
        .map(|f| {
            let distance = edit_distance(&wanted, &f.stem.to_lowercase())
                .min(edit_distance(&wanted, &f.name.to_lowercase()));
            (distance, f.name.as_str())
        })
        .collect();
    near.sort();
    if near.is_empty() {
        return anyhow!(
            "no such file, and the models folder ({folder}) holds no file for {} (`motif models` \
             lists what it finds; MOTIF_MODELS may point at a ComfyUI models folder)",
            flag.name()
        );
    }
    let names: Vec<&str> = near.iter().take(NEAR_CANDIDATES).map(|(_, n)| *n).collect();
    anyhow!(
        "no such file, nor a name in the models folder ({folder}); the nearest {} files there: {} \
         (`motif models` lists them all)",
        flag.name(),
        names.join(", ")
    )
}

/// A `--text-encoder`, `--vae`, `--lora` or `--motion-adapter` value: an
/// existing path, a path under the models folder, or a file of its
/// ComfyUI subfolders by name. An org/name (a `--vae` or
/// `--motion-adapter` in the Hugging Face cache) is left as is.
pub fn resolve_file_name(flag: Flag, spec: &str) -> Result<String> {
    if Path::new(spec).exists() {
        return Ok(spec.to_string());
    }
    if let Some(dir) = models_dir() {
        let candidate = dir.join(spec);
        if candidate.exists() {
            return Ok(candidate.to_string_lossy().into_owned());
        }
    }
    let files = folder_files();
    if let Some(path) = resolve_in(&files, flag, spec)? {
        return Ok(path.to_string_lossy().into_owned());
    }
    let repo = matches!(flag, Flag::Vae | Flag::MotionAdapter)
        && spec.split('/').count() == 2
        && !names_subfolder(spec);
    if repo {
        return Ok(spec.to_string());
    }
    Err(unknown(flag, spec, &files))
}

/// For a Wan transformer file given without `--text-encoder` or `--vae`:
/// the one file of the models folder that fits (a UMT5 as wide as the
/// text the transformer takes, a Wan VAE with its latent channels), as
/// (flag, name, path). Several that fit: an error naming them and the flag;
/// none: nothing (the engine's error says what to pass).
pub fn companions(
    model: &Path,
    text_encoder: bool,
    vae: bool,
) -> Result<Vec<(Flag, String, PathBuf)>> {
    let Ok(Some(Identified {
        role: Role::Transformer {
            text_dim,
            in_channels,
        },
        ..
    })) = identify::identify(model)
    else {
        return Ok(Vec::new());
    };
    let files = folder_files();
    let mut picked = Vec::new();
    let wanted = [
        (
            Flag::TextEncoder,
            text_encoder,
            format!("a UMT5 text encoder {text_dim} wide"),
        ),
        (
            Flag::Vae,
            vae,
            format!("a Wan VAE with {in_channels} latent channels"),
        ),
    ];
    for (flag, needed, what) in wanted {
        if !needed {
            continue;
        }
        let fitting: Vec<&FolderFile> = files
            .iter()
            .filter(|f| match &f.identified {
                Ok(Some(i)) => match (flag, i.role) {
                    (Flag::TextEncoder, Role::Umt5 { d_model }) => d_model == text_dim,
                    (Flag::Vae, Role::Vae { latent_channels }) => {
                        latent_channels == Some(in_channels)
                    }
                    _ => false,
                },
                _ => false,
            })
            .collect();
        match fitting[..] {
            [] => {}
            [one] => picked.push((flag, one.name.clone(), one.path.clone())),
            _ => {
                return Err(anyhow!(
                    "{}: a Wan transformer needs {what}, and the models folder holds {}: pass one \
                     with {} NAME ({})",
                    model.display(),
                    fitting.len(),
                    flag.name(),
                    fitting
                        .iter()
                        .map(|f| f.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }
        }
    }
    Ok(picked)
}

fn size_of(path: &Path) -> u64 {
    if path.is_file() {
        return std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    }
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| size_of(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}

/// The family that runs a model naming pipeline `class` ("AnimateDiff",
/// "Wan"), or a note that this build has none.
fn family_name(class: Option<&str>) -> &'static str {
    family_for_class(class).map_or("no family in this build", |f| f.name)
}

/// What a folder or file is and the family that runs it, for the listing;
/// `None` if not a model.
fn kind_of(path: &Path) -> Option<(String, &'static str)> {
    if path.is_file() {
        return (path.extension().and_then(|e| e.to_str()) == Some("safetensors")).then(|| {
            (
                "single-file checkpoint (.safetensors)".to_string(),
                family_name(None),
            )
        });
    }
    let index = path.join("model_index.json");
    let text = std::fs::read_to_string(&index).ok()?;
    let json: Value = serde_json::from_str(&text).ok()?;
    let named = json.get("_class_name").and_then(Value::as_str);
    let family = family_name(named);
    let class = named.unwrap_or("diffusers pipeline");
    let motion = if path.join("motion_adapter").is_dir() {
        ", SD UNet + motion_adapter/"
    } else if json
        .get("unet")
        .and_then(|u| u.get(1))
        .and_then(Value::as_str)
        == Some("UNetMotionModel")
    {
        ", merged motion UNet"
    } else {
        ""
    };
    Some((format!("diffusers folder ({class}{motion})"), family))
}

pub struct Listed {
    pub name: String,
    pub source: &'static str,
    pub kind: String,
    /// The model family that runs it ("AnimateDiff", "Wan").
    pub family: &'static str,
    pub bytes: u64,
    pub path: PathBuf,
    /// For a file of a ComfyUI subfolder: what its header says it is
    /// (`None` for folders, the bundled model and unreadable files).
    pub role: Option<Role>,
}

impl Listed {
    /// Whether it is a whole model (`--model`), not a part of one (a text
    /// encoder, a VAE, a LoRA).
    pub fn is_model(&self) -> bool {
        self.role.is_none_or(|r| r.flag() == Some("--model"))
    }
}

/// A file of a ComfyUI subfolder as the listing shows it: role, variant,
/// dtype, and what is wrong with it if it cannot load.
fn listed_file(file: FolderFile) -> Listed {
    let (kind, family, role) = match &file.identified {
        Ok(Some(i)) => {
            let mut kind = format!("{}, {}, {}", i.role.describe(), i.variant, i.dtype);
            if i.missing_bytes > 0 {
                kind.push_str(&format!(
                    "; TRUNCATED: {} bytes short (download it again)",
                    i.missing_bytes
                ));
            }
            (kind, i.family.name(), Some(i.role))
        }
        Ok(None) => (
            "safetensors file of no kind Motif runs".to_string(),
            "",
            None,
        ),
        Err(e) => (format!("unreadable: {e}"), "", None),
    };
    let source = file
        .name
        .split_once('/')
        .map_or("models folder", |(sub, _)| {
            identify::COMFY_FOLDERS
                .iter()
                .find(|s| **s == sub)
                .copied()
                .unwrap_or("models folder")
        });
    Listed {
        name: file.stem,
        source,
        kind,
        family,
        bytes: file.bytes,
        path: file.path,
        role,
    }
}

pub fn list_models() -> Vec<Listed> {
    let mut out = Vec::new();
    // Unpacked here so that the listed path is one the viewer can open.
    match bundled::folder() {
        Ok(path) => {
            let (kind, family) = kind_of(&path).unwrap_or_default();
            out.push(Listed {
                name: "default".into(),
                source: "bundled",
                kind,
                family,
                bytes: bundled::bytes(),
                path,
                role: None,
            });
        }
        Err(e) => out.push(Listed {
            name: "default".into(),
            source: "bundled",
            kind: format!("not unpacked: {e:#}"),
            family: "",
            bytes: bundled::bytes(),
            path: bundled::target().unwrap_or_default(),
            role: None,
        }),
    }
    if let Some(dir) = models_dir() {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            let mut paths: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            paths.sort();
            for path in paths {
                if let Some((kind, family)) = kind_of(&path) {
                    out.push(Listed {
                        name: path
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                        source: "models folder",
                        kind,
                        family,
                        bytes: size_of(&path),
                        path,
                        role: None,
                    });
                }
            }
        }
        out.extend(identify::comfy_files(&dir).into_iter().map(listed_file));
    }
    if let Some(cache) = motif_engine::weights::folder::hf_hub_cache() {
        if let Ok(entries) = std::fs::read_dir(&cache) {
            let mut repos: Vec<String> = entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter_map(|n| n.strip_prefix("models--").map(|r| r.replacen("--", "/", 1)))
                .collect();
            repos.sort();
            for repo in repos {
                if let Ok(snapshot) = motif_engine::weights::folder::resolve_in_cache(&cache, &repo)
                {
                    if let Some((kind, family)) = kind_of(&snapshot) {
                        let blobs = cache
                            .join(format!("models--{}", repo.replace('/', "--")))
                            .join("blobs");
                        out.push(Listed {
                            name: repo,
                            source: "Hugging Face cache",
                            kind,
                            family,
                            bytes: size_of(&blobs),
                            path: snapshot,
                            role: None,
                        });
                    }
                }
            }
        }
    }
    out
}
