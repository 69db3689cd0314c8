//! The default model, built into the binary (build.rs embeds every file of
//! assets/models/default) so that an installed or copied `motif` has it
//! without the source tree. The model loaders read folders, so on first use
//! the files are unpacked into the user's cache folder, under a name carrying
//! their hash: a binary with other weights unpacks its own copy instead of
//! using an older one.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};

mod table {
    include!(concat!(env!("OUT_DIR"), "/bundled_default.rs"));
}

/// What to tell a user whose cache folder cannot take the model.
const SET: &str = "set MOTIF_CACHE_DIR to a writable folder, or pass --model";

/// The total size of the bundled model's files.
pub fn bytes() -> u64 {
    table::FILES.iter().map(|(_, b)| b.len() as u64).sum()
}

/// The cache folder, by the pipeline cache's rules (engine gpu/kernel.rs):
/// `MOTIF_CACHE_DIR`, else `$XDG_CACHE_HOME/motif`, else `~/.cache/motif`.
/// `MOTIF_CACHE_DIR=off` turns off only the pipeline cache: the model has to
/// be unpacked somewhere to run, so it then goes to the usual folder.
fn cache_dir() -> Option<PathBuf> {
    let set = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = set("MOTIF_CACHE_DIR").filter(|v| v != "off") {
        return Some(PathBuf::from(dir));
    }
    set("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| set("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("motif"))
}

/// Where this binary's copy of the default model lives (whether or not it
/// is unpacked yet): `CACHE/bundled/default-HASH`.
pub fn target() -> Result<PathBuf> {
    let cache = cache_dir().ok_or_else(|| {
        anyhow!(
            "no folder to unpack the bundled default model into: MOTIF_CACHE_DIR, \
             XDG_CACHE_HOME and HOME are all unset ({SET})"
        )
    })?;
    Ok(cache
        .join("bundled")
        .join(format!("default-{}", &table::HASH[..16])))
}

/// The unpacked default model's folder, unpacking it first if this is the
/// first use. Safe when several processes start at once: each writes a
/// temporary folder beside the target and renames it into place, and the
/// first rename wins.
pub fn folder() -> Result<PathBuf> {
    let target = target()?;
    if target.exists() {
        check(&target)?;
        return Ok(target);
    }
    let parent = target
        .parent()
        .expect("target() is CACHE/bundled/default-HASH");
    std::fs::create_dir_all(parent).with_context(|| {
        format!(
            "cannot create {} to unpack the bundled default model ({SET})",
            parent.display()
        )
    })?;
    let name = target
        .file_name()
        .expect("target() ends in default-HASH")
        .to_string_lossy();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let temp = parent.join(format!(".{name}.{}.{nanos}.tmp", std::process::id()));
    if let Err(e) = write_all(&temp) {
        let _ = std::fs::remove_dir_all(&temp);
        return Err(e.context(format!(
            "cannot unpack the bundled default model into {} ({SET})",
            parent.display()
        )));
    }
    if let Err(e) = std::fs::rename(&temp, &target) {
        let _ = std::fs::remove_dir_all(&temp);
        // Another process renamed its copy first: use that one.
        if !target.is_dir() {
            return Err(anyhow!(
                "cannot move the unpacked default model to {}: {e} ({SET})",
                target.display()
            ));
        }
    }
    check(&target)?;
    Ok(target)
}

/// Writes every file of the model under `dir`, each flushed to disk before
/// the rename makes the folder visible.
fn write_all(dir: &Path) -> Result<()> {
    std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (rel, bytes) in table::FILES {
        let path = dir.join(rel);
        if let Some(sub) = path.parent() {
            std::fs::create_dir_all(sub).with_context(|| format!("creating {}", sub.display()))?;
        }
        let mut file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// An existing copy must hold every file at its size: a copy someone edited
/// or cut short would otherwise give other clips than the bundled model's.
fn check(dir: &Path) -> Result<()> {
    for (rel, bytes) in table::FILES {
        let path = dir.join(rel);
        let found = std::fs::metadata(&path).map(|m| m.len());
        if found.as_ref().ok() != Some(&(bytes.len() as u64)) {
            let found = match found {
                Ok(n) => format!("{n} bytes"),
                Err(e) => e.to_string(),
            };
            return Err(anyhow!(
                "{} is not the bundled default model this binary ships ({rel}: expected {} bytes, \
                 found {found}): delete that folder and it is unpacked again",
                dir.display(),
                bytes.len()
            ));
        }
    }
    Ok(())
}
