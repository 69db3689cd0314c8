//! Builds the bundled default model into the `motif` binary, so that an
//! installed or copied binary has it without the source tree
//! (src/bundled.rs unpacks it on first use).
//!
//! Every file under assets/models/default goes in (the `tokenizer` link
//! followed), found by walking the folder rather than from a list, so a file
//! added there cannot be left out. The table it writes, `bundled_default.rs`
//! in OUT_DIR, holds each file's path inside the model folder with its bytes
//! (`include_bytes!`), and the SHA-256 of them all: the name of the unpacked
//! copy, so that a binary with other weights never uses an older copy.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

const MODEL: &str = "assets/models/default";

fn main() {
    if let Err(e) = run() {
        // A build without the default would fail at the README's first
        // command; say so at build time instead.
        eprintln!("error: embedding the bundled default model: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let model = root.join(MODEL);
    if !model.join("model_index.json").is_file() {
        return Err(format!(
            "{} has no model_index.json: the checkout is incomplete",
            model.display()
        ));
    }
    let mut files = Vec::new();
    walk(&model, "", &mut files)?;
    files.sort();

    let mut hash = Sha256::new();
    let mut table = String::from(
        "/// Every file of assets/models/default: its path inside the model\n\
         /// folder (`/`-separated) and its bytes.\n\
         pub(crate) const FILES: &[(&str, &[u8])] = &[\n",
    );
    for (rel, path) in &files {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        // Lengths first, so that no two different sets of files hash alike
        // by moving bytes from one file's end to the next's name.
        hash.update((rel.len() as u64).to_le_bytes());
        hash.update(rel.as_bytes());
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(&bytes);
        let abs = path
            .to_str()
            .ok_or_else(|| format!("{}: the path is not UTF-8", path.display()))?;
        writeln!(table, "    ({rel:?}, include_bytes!({abs:?})),").expect("writing to a String");
    }
    table.push_str("];\n");
    let digest: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    writeln!(
        table,
        "/// SHA-256 of every path and its bytes, in hex.\npub(crate) const HASH: &str = {digest:?};"
    )
    .expect("writing to a String");

    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| e.to_string())?);
    std::fs::write(out.join("bundled_default.rs"), table)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(())
}

/// Collects the files under `dir` as (path inside the model, path on disk),
/// following links (the tokenizer is one), and asks Cargo to build again when
/// any of them or their folders change.
fn walk(dir: &Path, prefix: &str, files: &mut Vec<(String, PathBuf)>) -> Result<(), String> {
    // A folder's entry reruns the build when a file is added or removed in it.
    println!("cargo:rerun-if-changed={}", dir.display());
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = entry.path();
        let name = entry
            .file_name()
            .into_string()
            .map_err(|n| format!("{}: the name {n:?} is not UTF-8", dir.display()))?;
        let rel = format!("{prefix}{name}");
        // `metadata` follows the link; a dangling one is an error here.
        let meta = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.is_dir() {
            // The link's target is watched too: Cargo does not follow it.
            let real = path
                .canonicalize()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            walk(&real, &format!("{rel}/"), files)?;
        } else if meta.is_file() {
            println!("cargo:rerun-if-changed={}", path.display());
            files.push((rel, path));
        } else {
            return Err(format!("{}: not a file or folder", path.display()));
        }
    }
    Ok(())
}
