//! Atomic writes. Everything is written under a temporary name in the destination's own
//! directory (a rename is only atomic within one filesystem) and renamed into place last,
//! so readers see either the old clip or the whole new one, never a partial file.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::VideoError;

/// Makes temporary names unique between threads of one process; the pid separates processes.
static NEXT_TEMP_ID: AtomicU64 = AtomicU64::new(0);

/// A file or folder under a temporary name beside its destination. Dropping it removes it,
/// unless [`Temp::rename_to`] moved it into place.
struct Temp {
    path: PathBuf,
    is_dir: bool,
    placed: bool,
}

impl Temp {
    /// `.clip.mp4.tmp-<pid>-<n>` beside `dest`; `kind` is `tmp` or `old`.
    fn name_beside(dest: &Path, kind: &str) -> Result<PathBuf, VideoError> {
        let name = dest.file_name().ok_or_else(|| VideoError::Io {
            path: dest.to_path_buf(),
            action: "name a temporary file beside it",
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the path has no file name",
            ),
        })?;
        let id = NEXT_TEMP_ID.fetch_add(1, Ordering::Relaxed);
        let temp_name = format!(
            ".{}.{kind}-{}-{id}",
            name.to_string_lossy(),
            std::process::id()
        );
        Ok(dest.with_file_name(temp_name))
    }

    fn file(dest: &Path, bytes: &[u8]) -> Result<Temp, VideoError> {
        let temp = Temp {
            path: Self::name_beside(dest, "tmp")?,
            is_dir: false,
            placed: false,
        };
        write_new_file(&temp.path, bytes).map_err(|source| VideoError::Io {
            path: dest.to_path_buf(),
            action: "write a temporary file beside it",
            source,
        })?;
        Ok(temp)
    }

    fn dir(dest: &Path) -> Result<Temp, VideoError> {
        let path = Self::name_beside(dest, "tmp")?;
        fs::create_dir(&path).map_err(|source| VideoError::Io {
            path: dest.to_path_buf(),
            action: "create a temporary folder beside it",
            source,
        })?;
        Ok(Temp {
            path,
            is_dir: true,
            placed: false,
        })
    }

    /// Renames the folder `from` to a temporary name that is removed on drop.
    fn move_aside(from: &Path) -> Result<Temp, VideoError> {
        let path = Self::name_beside(from, "old")?;
        fs::rename(from, &path).map_err(|source| VideoError::Io {
            path: from.to_path_buf(),
            action: "move the existing folder aside",
            source,
        })?;
        Ok(Temp {
            path,
            is_dir: true,
            placed: false,
        })
    }

    fn rename_to(mut self, dest: &Path) -> Result<(), VideoError> {
        fs::rename(&self.path, dest).map_err(|source| VideoError::Io {
            path: dest.to_path_buf(),
            action: "rename the temporary copy into place",
            source,
        })?;
        self.placed = true;
        Ok(())
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if self.placed {
            return;
        }
        // Best effort: an error here would hide the error that got us here.
        let _ = if self.is_dir {
            fs::remove_dir_all(&self.path)
        } else {
            fs::remove_file(&self.path)
        };
    }
}

fn write_new_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = fs::File::create_new(path)?;
    file.write_all(bytes)?;
    // Flush to disk before the rename publishes the name, so a crash cannot leave the final
    // name pointing at an empty file.
    file.sync_all()
}

/// Writes `bytes` at `path` and `sidecar_bytes` at `sidecar`, replacing files already there.
/// On error no temporary file is left, and the clip is never left in place without its
/// sidecar: if the sidecar cannot be renamed into place, the clip just placed is removed.
pub(crate) fn write_file_with_sidecar(
    path: &Path,
    bytes: &[u8],
    sidecar: &Path,
    sidecar_bytes: &[u8],
) -> Result<(), VideoError> {
    let clip = Temp::file(path, bytes)?;
    let recipe = Temp::file(sidecar, sidecar_bytes)?;
    clip.rename_to(path)?;
    if let Err(error) = recipe.rename_to(sidecar) {
        // A clip without its sidecar would look complete; take it back out.
        let _ = fs::remove_file(path);
        return Err(error);
    }
    Ok(())
}

/// Writes a folder holding `files` (name, bytes) at `dest`, replacing a folder already there
/// (the caller decides whether it may be replaced). On error the old folder, if any, is back
/// in place and no temporary folder is left.
pub(crate) fn write_dir(dest: &Path, files: &[(String, Vec<u8>)]) -> Result<(), VideoError> {
    let new = Temp::dir(dest)?;
    for (name, bytes) in files {
        write_new_file(&new.path.join(name), bytes).map_err(|source| VideoError::Io {
            path: dest.join(name),
            action: "write it in a temporary folder",
            source,
        })?;
    }
    if fs::symlink_metadata(dest).is_err() {
        return new.rename_to(dest);
    }
    // rename() will not replace a non-empty folder, so the old one steps aside first and is
    // deleted (when `old` drops) only once the new one is in place.
    let old = Temp::move_aside(dest)?;
    if let Err(error) = new.rename_to(dest) {
        let _ = old.rename_to(dest);
        return Err(error);
    }
    drop(old);
    Ok(())
}
