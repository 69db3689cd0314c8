//! Where a model lives: a path to a diffusers folder or a single file, or an
//! `org/name` id resolved offline in the local Hugging Face cache.

use std::path::{Path, PathBuf};

use crate::error::LoadError;

/// The Hugging Face hub cache folder: `HF_HUB_CACHE`, else `HF_HOME/hub`,
/// else `~/.cache/huggingface/hub` (the `huggingface_hub` rules).
pub fn hf_hub_cache() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|s| !s.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|s| !s.is_empty()) {
        return Some(PathBuf::from(p).join("hub"));
    }
    let home = std::env::var_os("HOME").or_else(|| std::env::var_os("USERPROFILE"))?;
    Some(
        PathBuf::from(home)
            .join(".cache")
            .join("huggingface")
            .join("hub"),
    )
}

/// Resolves `org/name` in the cache at `cache`: `models--org--name/refs/main`
/// names the commit whose `snapshots/<commit>` folder holds the files; with no
/// `refs/main`, a single snapshot is taken.
pub fn resolve_in_cache(cache: &Path, repo_id: &str) -> Result<PathBuf, LoadError> {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    if !repo.is_dir() {
        return Err(LoadError::Layout {
            path: repo,
            message: format!(
                "model `{repo_id}` is not in the Hugging Face cache (Motif never downloads; fetch it with \
                 `huggingface-cli download {repo_id}` on a connected machine, or pass a folder path)"
            ),
        });
    }
    let snapshots = repo.join("snapshots");
    let refs_main = repo.join("refs").join("main");
    if let Ok(commit) = std::fs::read_to_string(&refs_main) {
        let snap = snapshots.join(commit.trim());
        if snap.is_dir() {
            return Ok(snap);
        }
        return Err(LoadError::Layout {
            path: refs_main,
            message: format!(
                "names snapshot `{}`, which is missing from {}",
                commit.trim(),
                snapshots.display()
            ),
        });
    }
    let found: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .map_err(|source| LoadError::Io {
            path: snapshots.clone(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(LoadError::Layout {
            path: snapshots,
            message: "holds no snapshot".into(),
        }),
        _ => Err(LoadError::Layout {
            path: snapshots,
            message:
                "holds several snapshots and refs/main is missing: pass the snapshot folder itself"
                    .into(),
        }),
    }
}

/// A model argument: an existing path, or an `org/name` repo id in the cache.
pub fn resolve_model(spec: &str) -> Result<PathBuf, LoadError> {
    let path = PathBuf::from(spec);
    if path.exists() {
        return Ok(path);
    }
    let looks_like_repo =
        spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.contains('\\');
    if looks_like_repo {
        let cache = hf_hub_cache().ok_or_else(|| LoadError::Layout {
            path: path.clone(),
            message: "no such path, and no Hugging Face cache folder is known (set HF_HUB_CACHE or HF_HOME)".into(),
        })?;
        return resolve_in_cache(&cache, spec);
    }
    Err(LoadError::Io {
        path,
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
    })
}

/// The folder of one component (`unet`, `vae`, ...) of a diffusers model,
/// with a clear error when it is missing.
pub fn component_dir(root: &Path, component: &str) -> Result<PathBuf, LoadError> {
    let dir = root.join(component);
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(LoadError::Layout {
            path: root.to_path_buf(),
            message: format!("missing the `{component}/` folder of a diffusers model"),
        })
    }
}
