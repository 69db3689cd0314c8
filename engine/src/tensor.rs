//! GPU-resident tensors: a shape, a dtype and a pooled storage buffer.
//! Tensors are always contiguous (row-major); `reshape` shares the storage.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use half::f16;

use crate::error::{EngineError, Result};
pub use crate::gpu::DType;
use crate::gpu::{Binding, Gpu};

/// A storage buffer that returns to the pool when its last tensor is dropped.
pub(crate) struct Storage {
    buffer: Option<wgpu::Buffer>,
    /// The pool's size class of the buffer.
    class: u64,
    pool: Arc<crate::gpu::PoolHandle>,
    /// Set on weights (see [`Tensor::into_constant`]): ops may then keep
    /// what they derive from the values in `derived`.
    constant: AtomicBool,
    derived: Mutex<Vec<(DerivedKey, Arc<dyn Any + Send + Sync>)>>,
}

/// What an op derived from a constant tensor, and how: the op's name and
/// the numbers that fix the derivation (shape of the view, layout, ...).
pub(crate) type DerivedKey = (&'static str, Vec<usize>);

/// Derived forms kept per tensor: a model run at one size needs one per op
/// that reads the tensor; a few more cover a change of size without letting
/// an interactive session pile them up.
const MAX_DERIVED: usize = 4;

impl Drop for Storage {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            self.pool.give_back(b, self.class);
        }
    }
}

/// The smallest storage binding a kernel gets: one vec4 (16 bytes), what
/// WGSL's `array<vec4<f32>>` needs at least; the bytes past the tensor's
/// end are never read as its values (every kernel bounds its indices).
const MIN_BINDING_BYTES: u64 = 16;

/// A binding of `bytes`, widened to [`MIN_BINDING_BYTES`] where the buffer
/// (`available` bytes from the binding's start) has them; any other size
/// is kept as it is (a plan's stand-in buffers are smaller than what they
/// stand for, and its checks read the binding's own size).
fn at_least_one_vec4(bytes: u64, available: u64) -> u64 {
    match bytes < MIN_BINDING_BYTES {
        true => MIN_BINDING_BYTES.min(available).max(bytes).max(4),
        false => bytes,
    }
}

#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    shape: Vec<usize>,
    dtype: DType,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {})", self.shape, self.dtype)
    }
}

/// Formats a shape as `[2, 3, 4]` for error messages.
pub fn fmt_shape(shape: &[usize]) -> String {
    format!("{shape:?}")
}

impl Tensor {
    /// A tensor with undefined contents (a recycled buffer may hold old data).
    pub fn empty(gpu: &Gpu, shape: &[usize], dtype: DType) -> Result<Self> {
        let numel: usize = shape.iter().product();
        let bytes = (numel as u64 * dtype.size_bytes()).div_ceil(4) * 4;
        let (buffer, class) = gpu.alloc(bytes)?;
        if let (Some(byte), false) = (gpu.poison, gpu.is_plan()) {
            // The whole size class: reads past a tensor's end are bugs too.
            gpu.write(&buffer, 0, &vec![byte; buffer.size() as usize]);
        }
        Ok(Tensor {
            storage: Arc::new(Storage {
                buffer: Some(buffer),
                class,
                pool: gpu.pool.clone(),
                constant: AtomicBool::new(false),
                derived: Mutex::new(Vec::new()),
            }),
            shape: shape.to_vec(),
            dtype,
        })
    }

    pub fn zeros(gpu: &Gpu, shape: &[usize], dtype: DType) -> Result<Self> {
        let t = Self::empty(gpu, shape, dtype)?;
        gpu.clear(t.buffer(), 0, t.padded_bytes());
        Ok(t)
    }

    /// Uploads f32 values, converting to `dtype` (f16 rounds to nearest).
    pub fn from_f32(gpu: &Gpu, data: &[f32], shape: &[usize], dtype: DType) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(EngineError::Shape {
                op: "upload",
                expected: format!("{} values for shape {}", numel, fmt_shape(shape)),
                found: format!("{} values", data.len()),
            });
        }
        let t = Self::empty(gpu, shape, dtype)?;
        match dtype {
            DType::F32 => gpu.write(t.buffer(), 0, bytemuck::cast_slice(data)),
            DType::F16 => {
                let h: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
                gpu.write(t.buffer(), 0, bytemuck::cast_slice(&h))
            }
        }
        Ok(t)
    }

    /// Uploads raw little-endian bytes already in `dtype`'s layout (weights
    /// straight from a file).
    pub fn from_bytes(gpu: &Gpu, bytes: &[u8], shape: &[usize], dtype: DType) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if bytes.len() as u64 != numel as u64 * dtype.size_bytes() {
            return Err(EngineError::Shape {
                op: "upload",
                expected: format!(
                    "{} bytes for {} {}",
                    numel as u64 * dtype.size_bytes(),
                    dtype,
                    fmt_shape(shape)
                ),
                found: format!("{} bytes", bytes.len()),
            });
        }
        let t = Self::empty(gpu, shape, dtype)?;
        gpu.write(t.buffer(), 0, bytes);
        Ok(t)
    }

    /// Downloads the values as f32 (waits for all pending GPU work).
    pub fn to_f32(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let bytes = gpu.read(self.buffer(), 0, self.size_bytes())?;
        Ok(match self.dtype {
            DType::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(&bytes),
            DType::F16 => bytemuck::pod_collect_to_vec::<u8, f16>(&bytes)
                .iter()
                .map(|h| h.to_f32())
                .collect(),
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Bytes of the values (not of the pooled buffer).
    pub fn size_bytes(&self) -> u64 {
        self.numel() as u64 * self.dtype.size_bytes()
    }

    fn padded_bytes(&self) -> u64 {
        self.size_bytes().div_ceil(4) * 4
    }

    /// Marks the tensor as a weight: its values never change (no tensor's
    /// do) and it lives as long as its model, so ops may compute forms of it
    /// once and keep them with it (the CPU-adapter matmul packs weights once,
    /// not on every call). Costs the memory of those forms. Model loaders
    /// mark every weight they upload.
    pub fn into_constant(self) -> Self {
        self.storage.constant.store(true, Ordering::Relaxed);
        self
    }

    /// Whether [`Tensor::into_constant`] marked this tensor (or one sharing its storage).
    pub fn is_constant(&self) -> bool {
        self.storage.constant.load(Ordering::Relaxed)
    }

    /// The form of this constant tensor that `key` names, made by `make` on
    /// first use and kept with the tensor's storage (so with every reshape of
    /// it) until the storage is dropped.
    pub(crate) fn derived<T: Any + Send + Sync>(
        &self,
        key: DerivedKey,
        make: impl FnOnce() -> Result<T>,
    ) -> Result<Arc<T>> {
        debug_assert!(
            self.is_constant(),
            "only constant tensors keep derived forms"
        );
        let found = {
            let cache = self.storage.derived.lock().expect("derived lock poisoned");
            cache
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.clone())
        };
        if let Some(v) = found.and_then(|v| v.downcast::<T>().ok()) {
            return Ok(v);
        }
        let v = Arc::new(make()?);
        let mut cache = self.storage.derived.lock().expect("derived lock poisoned");
        if cache.len() >= MAX_DERIVED {
            cache.remove(0);
        }
        cache.push((key, v.clone()));
        Ok(v)
    }

    /// The same storage seen with another shape of equal element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if numel != self.numel() {
            return Err(EngineError::Shape {
                op: "reshape",
                expected: format!("{} elements", self.numel()),
                found: format!("{} ({} elements)", fmt_shape(shape), numel),
            });
        }
        Ok(Tensor {
            storage: self.storage.clone(),
            shape: shape.to_vec(),
            dtype: self.dtype,
        })
    }

    pub(crate) fn buffer(&self) -> &wgpu::Buffer {
        self.storage
            .buffer
            .as_ref()
            .expect("storage holds its buffer until dropped")
    }

    /// The whole tensor as one binding: at least [`MIN_BINDING_BYTES`] of
    /// its buffer (pool buffers are 256 bytes and up), so that a shader
    /// reading it as vec4s binds a tensor of fewer than four values too.
    pub(crate) fn binding(&self) -> Binding<'_> {
        let buffer = self.buffer();
        Binding {
            buffer,
            offset: 0,
            size: at_least_one_vec4(self.padded_bytes(), buffer.size()),
        }
    }

    /// Elements `[start, start + count)` as one binding. Binding offsets must
    /// be aligned (256 bytes on most adapters), so the binding may start a
    /// little earlier: the returned element offset says where `start` lies
    /// inside it, and the shader adds it to its indices.
    pub(crate) fn window(&self, gpu: &Gpu, start: usize, count: usize) -> (Binding<'_>, u32) {
        let es = self.dtype.size_bytes();
        let align = gpu.storage_offset_alignment();
        let byte_start = start as u64 * es;
        let offset = byte_start / align * align;
        let end = ((start + count) as u64 * es).div_ceil(4) * 4;
        let elem_offset = ((byte_start - offset) / es) as u32;
        (
            Binding {
                buffer: self.buffer(),
                offset,
                size: at_least_one_vec4(end - offset, self.buffer().size() - offset),
            },
            elem_offset,
        )
    }

    /// The largest element count per window such that a window (with its
    /// alignment slack) fits in one binding.
    pub(crate) fn max_window_elems(gpu: &Gpu, dtype: DType) -> usize {
        let slack = gpu.storage_offset_alignment() + 4;
        ((gpu.max_binding_bytes() - slack) / dtype.size_bytes()) as usize
    }

    /// True if the whole tensor fits in one binding.
    pub(crate) fn fits_binding(&self, gpu: &Gpu) -> bool {
        self.padded_bytes() <= gpu.max_binding_bytes()
    }
}
