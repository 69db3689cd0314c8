//! Prompt embeddings kept on disk, so that a re-roll (same prompt, another
//! seed) skips the text encoder: for Wan that is UMT5-XXL, 5.7 B parameters
//! streamed block by block, the slowest part of a short generation.
//!
//! One file per prompt, named by a SHA-256 key over everything the
//! embedding depends on: the text encoder's identity (see
//! [`EncoderIdentity`]), the tokenizer file's bytes, the prompt after
//! cleaning, the token count and the storage precision. A file holds the
//! prompt's own rows only (the pipelines zero the rest), followed by a
//! checksum; an entry that does not read back whole, with its key and
//! shape, is ignored with a warning and written again. Files are written to
//! a temporary name and renamed, and the folder is kept under a size bound
//! by deleting the least recently used entries.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::gpu::DType;

/// The first bytes of every entry; the trailing digit is the layout's
/// version.
const MAGIC: &[u8; 8] = b"MOTIFPE1";
/// magic, key, rows (u32), dim (u32), then the values, then the checksum.
const HEADER_BYTES: usize = 8 + 32 + 4 + 4;
const CHECKSUM_BYTES: usize = 32;
/// Default bound on the folder: a few hundred prompts of UMT5-XXL
/// (4096 floats per token, tens of tokens each).
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;

/// The key of one cache entry.
pub type PromptKey = [u8; 32];

/// What makes one text encoder's output what it is, hashed once at load.
///
/// The weights are identified by their files' paths, sizes and
/// modification times rather than by their contents: hashing UMT5-XXL's
/// 11 GB at every load would cost more than the encoding it saves, and a
/// download, conversion or edit of a weight file changes its size or its
/// time. The small files (config, tokenizer) are hashed whole.
#[derive(Debug, Clone)]
pub struct EncoderIdentity {
    digest: [u8; 32],
}

impl EncoderIdentity {
    /// The identity of the encoder in `encoder_dir` (every file in it:
    /// config and weights) with the tokenizer file `tokenizer`.
    pub fn of(encoder_dir: &Path, tokenizer: &Path) -> std::io::Result<Self> {
        let mut h = Sha256::new();
        h.update(b"motif prompt cache: encoder");
        let dir = fs::canonicalize(encoder_dir)?;
        let mut files: Vec<PathBuf> = fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for file in &files {
            let meta = fs::metadata(file)?;
            let mtime = meta
                .modified()?
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            field(&mut h, file.to_string_lossy().as_bytes());
            h.update(meta.len().to_le_bytes());
            h.update(mtime.to_le_bytes());
            if file.extension().is_some_and(|e| e == "json") {
                field(&mut h, &fs::read(file)?);
            }
        }
        field(&mut h, b"tokenizer");
        field(&mut h, &fs::read(tokenizer)?);
        Ok(EncoderIdentity {
            digest: h.finalize().into(),
        })
    }

    /// The key of `cleaned_prompt` encoded to `max_length` tokens in `dtype`.
    pub fn key(&self, cleaned_prompt: &str, max_length: usize, dtype: DType) -> PromptKey {
        let mut h = Sha256::new();
        h.update(self.digest);
        field(&mut h, cleaned_prompt.as_bytes());
        h.update((max_length as u64).to_le_bytes());
        field(&mut h, dtype.to_string().as_bytes());
        h.finalize().into()
    }
}

/// A length-prefixed field, so that no two different sequences of fields
/// hash the same bytes.
fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// A folder of prompt embeddings.
#[derive(Debug, Clone)]
pub struct PromptCache {
    dir: PathBuf,
    max_bytes: u64,
}

impl PromptCache {
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64) -> Self {
        PromptCache {
            dir: dir.into(),
            max_bytes,
        }
    }

    /// `prompts/` in Motif's cache folder (`MOTIF_CACHE_DIR`, else the
    /// user's cache folder + `motif`, as the compiled-pipeline cache);
    /// None where `MOTIF_CACHE_DIR=off` or no folder is known.
    pub fn default_location() -> Option<Self> {
        crate::gpu::cache_dir().map(|d| Self::new(d.join("prompts"), DEFAULT_MAX_BYTES))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &PromptKey) -> PathBuf {
        let name: String = key.iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{name}.bin"))
    }

    /// The rows stored under `key` ([rows · dim] values), None on a miss.
    /// An entry that is there but unreadable, torn or of another key or
    /// width is reported through `warn` and treated as a miss (the caller
    /// encodes again and [`Self::put`] replaces it).
    pub fn get(
        &self,
        key: &PromptKey,
        dim: usize,
        warn: &mut dyn FnMut(String),
    ) -> Option<Vec<f32>> {
        let path = self.path(key);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                warn(format!(
                    "prompt cache entry {}: {e}; encoding again",
                    path.display()
                ));
                return None;
            }
        };
        match decode_entry(&bytes, key, dim) {
            Ok(values) => {
                // Least recently used, not least recently written, goes first.
                if let Ok(f) = fs::File::options().append(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                Some(values)
            }
            Err(why) => {
                warn(format!(
                    "prompt cache entry {}: {why}; ignoring it and encoding again",
                    path.display()
                ));
                None
            }
        }
    }

    /// Stores `rows` ([rows · dim] values) under `key`, atomically, then
    /// evicts the least recently used entries beyond the size bound.
    /// Failing to write only costs the next run its encoding: reported
    /// through `warn`, never an error.
    pub fn put(&self, key: &PromptKey, rows: &[f32], dim: usize, warn: &mut dyn FnMut(String)) {
        let path = self.path(key);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let written = fs::create_dir_all(&self.dir)
            .and_then(|_| fs::write(&tmp, encode_entry(key, rows, dim)))
            .and_then(|_| fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            warn(format!(
                "prompt cache entry {}: not written: {e}",
                path.display()
            ));
            return;
        }
        self.evict(&path);
    }

    /// Deletes the least recently used entries until the folder's entries
    /// fit `max_bytes`; `keep` (the entry just written) goes last.
    fn evict(&self, keep: &Path) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(SystemTime, u64, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "bin"))
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some((meta.modified().ok()?, meta.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort_by_key(|(t, _, p)| (p == keep, *t));
        for (_, len, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
    }
}

fn encode_entry(key: &PromptKey, rows: &[f32], dim: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + rows.len() * 4 + CHECKSUM_BYTES);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(key);
    out.extend_from_slice(&((rows.len() / dim.max(1)) as u32).to_le_bytes());
    out.extend_from_slice(&(dim as u32).to_le_bytes());
    for v in rows {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let sum: [u8; 32] = Sha256::digest(&out).into();
    out.extend_from_slice(&sum);
    out
}

/// The values of an entry, or why it cannot be trusted.
fn decode_entry(bytes: &[u8], key: &PromptKey, dim: usize) -> Result<Vec<f32>, String> {
    if bytes.len() < HEADER_BYTES + CHECKSUM_BYTES || &bytes[..8] != MAGIC {
        return Err("not a prompt cache entry of this version".into());
    }
    let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_BYTES);
    if Sha256::digest(body).as_slice() != sum {
        return Err("checksum mismatch (torn or corrupt file)".into());
    }
    if &body[8..40] != key {
        return Err("stored under another key".into());
    }
    let word = |at: usize| u32::from_le_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
    let (rows, stored_dim) = (word(40) as usize, word(44) as usize);
    if stored_dim != dim {
        return Err(format!("width {stored_dim}, expected {dim}"));
    }
    let values = &body[HEADER_BYTES..];
    if values.len() != rows * dim * 4 {
        return Err(format!(
            "{} bytes of values for {rows} rows of {dim}",
            values.len()
        ));
    }
    Ok(values
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("motif-prompt-cache-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn an_entry_reads_back_and_a_damaged_one_is_refused_with_a_warning() {
        let cache = PromptCache::new(temp("damaged"), DEFAULT_MAX_BYTES);
        let (key, other) = ([7u8; 32], [8u8; 32]);
        let rows: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 1.0).collect();
        let mut warnings = Vec::new();
        let mut warn = |w: String| warnings.push(w);
        assert_eq!(cache.get(&key, 4, &mut warn), None);
        cache.put(&key, &rows, 4, &mut warn);
        assert_eq!(cache.get(&key, 4, &mut warn), Some(rows.clone()));
        // Another width, another key's file, a torn file: all misses.
        assert_eq!(cache.get(&key, 3, &mut warn), None);
        fs::copy(cache.path(&key), cache.path(&other)).unwrap();
        assert_eq!(cache.get(&other, 4, &mut warn), None);
        let bytes = fs::read(cache.path(&key)).unwrap();
        fs::write(cache.path(&key), &bytes[..bytes.len() - 5]).unwrap();
        assert_eq!(cache.get(&key, 4, &mut warn), None);
        let mut flipped = bytes.clone();
        flipped[HEADER_BYTES + 2] ^= 1;
        fs::write(cache.path(&key), &flipped).unwrap();
        assert_eq!(cache.get(&key, 4, &mut warn), None);
        assert_eq!(warnings.len(), 4, "{warnings:#?}");
        assert!(warnings[3].contains("checksum"), "{}", warnings[3]);
        let _ = fs::remove_dir_all(cache.dir());
    }

    #[test]
    fn the_least_recently_used_entries_go_beyond_the_bound() {
        let dir = temp("evict");
        let entry = (HEADER_BYTES + 100 * 4 + CHECKSUM_BYTES) as u64;
        let cache = PromptCache::new(&dir, 2 * entry);
        let rows = vec![0.25f32; 100];
        let mut warn = |w: String| panic!("{w}");
        let t0 = SystemTime::now() - std::time::Duration::from_secs(100);
        for k in 0..3u8 {
            cache.put(&[k; 32], &rows, 10, &mut warn);
            // Distinct times whatever the file system's resolution.
            let f = fs::File::options()
                .append(true)
                .open(cache.path(&[k; 32]))
                .unwrap();
            f.set_modified(t0 + std::time::Duration::from_secs(k as u64))
                .unwrap();
        }
        // Room for two: writing entry 2 evicted entry 0, the oldest. Reading
        // entry 1 makes it the most recently used, so writing entry 3
        // evicts entry 2.
        assert!(cache.get(&[1; 32], 10, &mut warn).is_some());
        cache.put(&[3; 32], &rows, 10, &mut warn);
        let left: Vec<bool> = (0..4u8).map(|k| cache.path(&[k; 32]).exists()).collect();
        assert_eq!(left, [false, true, false, true]);
        let _ = fs::remove_dir_all(&dir);
    }
}
