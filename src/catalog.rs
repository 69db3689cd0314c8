//! What Motif can offer by name: style presets (`assets/styles.json`, built
//! in) and models (`motif models`): the bundled default (built into the
//! binary, unpacked into the cache folder on first use), the models folder
//! (`MOTIF_MODELS`, else the user's data directory) and the Hugging Face
//! cache.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};

use crate::bundled;
use motif_engine::pipelines::family_for_class;
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

/// A `--model` value: an existing path, a name in the models folder,
/// `default` (the bundled model, unpacked on first use), or (left as is) an
/// org/name for the Hugging Face cache.
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
    Ok(spec.to_string())
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
            });
        }
        Err(e) => out.push(Listed {
            name: "default".into(),
            source: "bundled",
            kind: format!("not unpacked: {e:#}"),
            family: "",
            bytes: bundled::bytes(),
            path: bundled::target().unwrap_or_default(),
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
                    });
                }
            }
        }
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
                        });
                    }
                }
            }
        }
    }
    out
}
