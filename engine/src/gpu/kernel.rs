//! Shader modules and compute pipelines, compiled once per variant and cached;
//! the per-dispatch parameter blocks; and the dispatch itself.
//!
//! Every operator shader follows one binding convention: `@binding(0)` is a
//! uniform struct of parameters, `@binding(1..)` are storage buffers, each
//! passed with its slot number by the op file. The storage element type is spelled `st`
//! (and `st4` for four of them) in the WGSL source; the prelude chosen here
//! aliases it to `f32` or `f16`, which is how one source serves both dtypes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{DType, Gpu};
use crate::error::{EngineError, Result};

/// One compiled variant of an operator shader.
pub(crate) struct Kernel {
    /// The operator family, as in `shaders/<family>.wgsl` (also the op name in errors).
    pub op: &'static str,
    /// The WGSL source (`include_str!` of the family's file).
    pub source: &'static str,
    pub entry: &'static str,
    /// Storage type that `st` aliases.
    pub dtype: DType,
    /// Values of `override` constants (tile sizes, fused activation, ...).
    pub constants: Vec<(&'static str, f64)>,
}

/// A storage buffer range bound to one binding slot.
#[derive(Clone, Copy)]
pub(crate) struct Binding<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

const UNIFORM_ARENA_BYTES: u64 = 1 << 16;

#[derive(Default)]
pub(crate) struct UniformArenas {
    buffers: Vec<wgpu::Buffer>,
    /// (arena index, byte offset) of the next free slot in this submission.
    cursor: (usize, u64),
}

#[derive(Default)]
pub(crate) struct KernelCache {
    pub(super) modules: Mutex<HashMap<(&'static str, Option<DType>), wgpu::ShaderModule>>,
    pub(super) pipelines: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
    /// Variants that failed to compile, with the error (see `Gpu::compile`).
    pub(super) failed: Mutex<HashMap<String, String>>,
    pub(crate) disk: Option<DiskCache>,
}

/// The driver's compiled pipelines, kept on disk between runs (wgpu's
/// `PipelineCache`, Vulkan only), so that a second run reaches its first
/// preview without compiling every kernel again. One file per adapter and
/// driver (`wgpu::util::pipeline_cache_key`), written when the GPU closes.
pub(crate) struct DiskCache {
    cache: wgpu::PipelineCache,
    path: std::path::PathBuf,
    /// Pipelines compiled since the file was read.
    dirty: std::sync::atomic::AtomicBool,
}

/// Where pipeline caches live: `MOTIF_CACHE_DIR`, else the user's cache
/// folder (`XDG_CACHE_HOME` or `~/.cache`) + `motif`. `MOTIF_CACHE_DIR=off`
/// (or empty) turns the cache off.
pub(crate) fn cache_dir() -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    match std::env::var_os("MOTIF_CACHE_DIR") {
        Some(v) if v.is_empty() || v == "off" => None,
        Some(v) => Some(PathBuf::from(v)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|d| d.join("motif")),
    }
}

impl DiskCache {
    /// Opens the cache file for this adapter, or an empty cache where none
    /// exists or the file does not fit the adapter and driver. None where the
    /// adapter has no pipeline caches or no cache folder is known.
    pub(crate) fn open(
        device: &wgpu::Device,
        info: &wgpu::AdapterInfo,
        features: wgpu::Features,
        dir: Option<std::path::PathBuf>,
    ) -> Option<Self> {
        if !features.contains(wgpu::Features::PIPELINE_CACHE) {
            return None;
        }
        let key = wgpu::util::pipeline_cache_key(info)?;
        let path = dir.or_else(cache_dir)?.join(key);
        let data = std::fs::read(&path).ok();
        // SAFETY: the data is what `get_data` wrote for an adapter with the
        // same key (the file name); wgpu checks its header against the
        // adapter and driver, and `fallback` turns a mismatch into an empty
        // cache rather than an error.
        let cache = unsafe {
            device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                label: Some("motif pipelines"),
                data: data.as_deref(),
                fallback: true,
            })
        };
        Some(DiskCache {
            cache,
            path,
            dirty: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Writes the cache if pipelines were compiled since it was read: to a
    /// temporary file, then renamed, so that a crash leaves no torn file.
    /// Failing to write only costs the next run its compile time.
    pub(crate) fn save(&self) {
        if !self.dirty.swap(false, std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let Some(data) = self.cache.get_data() else {
            return;
        };
        let Some(dir) = self.path.parent() else {
            return;
        };
        let tmp = self
            .path
            .with_extension(format!("tmp{}", std::process::id()));
        let written = std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(&tmp, &data))
            .and_then(|_| std::fs::rename(&tmp, &self.path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    pub(crate) fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl UniformArenas {
    /// Parameter slots are unique within one submission; after a submit the
    /// arenas are reused (queue writes are ordered after earlier submissions).
    pub(crate) fn reset(&mut self) {
        self.cursor = (0, 0);
    }
}

impl KernelCache {
    pub(crate) fn pipeline_count(&self) -> usize {
        self.pipelines.lock().expect("pipeline lock poisoned").len()
    }
}

fn prelude(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "alias st = f32;\nalias st4 = vec4<f32>;\n",
        DType::F16 => "enable f16;\nalias st = f16;\nalias st4 = vec4<f16>;\n",
    }
}

/// Splits a 1-D workgroup count over x and y, since one dimension holds at
/// most 65535 workgroups. Shaders rebuild the index as `x + y * num_workgroups.x`.
pub(crate) fn grid_1d(workgroups: u64) -> [u32; 3] {
    const MAX: u64 = 65535;
    if workgroups <= MAX {
        [workgroups.max(1) as u32, 1, 1]
    } else {
        let y = workgroups.div_ceil(MAX);
        [workgroups.div_ceil(y) as u32, y as u32, 1]
    }
}

impl Gpu {
    fn pipeline(&self, k: &Kernel) -> Result<Arc<wgpu::ComputePipeline>> {
        if k.dtype == DType::F16 && !self.has_f16() {
            return Err(EngineError::F16Unsupported {
                adapter: self.adapter().name.clone(),
            });
        }
        self.compile(k.op, k.source, k.entry, Some(k.dtype), &k.constants)
    }

    /// The pipeline of one variant, compiled once through the one cache (in
    /// memory and on disk). `dtype` picks the prelude of `st` aliases; None:
    /// the source is taken as it is, for shaders whose own `enable`
    /// directives must come before any declaration (the cooperative-matrix
    /// kernels, ops/coop.rs). A variant that fails to compile is remembered
    /// with its error, so that routing asks once and falls back from then on.
    pub(crate) fn compile(
        &self,
        op: &'static str,
        source: &'static str,
        entry: &'static str,
        dtype: Option<DType>,
        constants: &[(&'static str, f64)],
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let key = format!("{op}:{entry}:{dtype:?}:{constants:?}");
        if let Some(p) = self
            .kernels
            .pipelines
            .lock()
            .expect("pipeline lock poisoned")
            .get(&key)
        {
            return Ok(p.clone());
        }
        if let Some(e) = self
            .kernels
            .failed
            .lock()
            .expect("pipeline lock poisoned")
            .get(&key)
        {
            return Err(EngineError::Device(e.clone()));
        }
        let module = {
            let mut modules = self.kernels.modules.lock().expect("module lock poisoned");
            modules
                .entry((op, dtype))
                .or_insert_with(|| {
                    let source = match dtype {
                        Some(dtype) => format!("{}{}", prelude(dtype), source),
                        None => source.to_string(),
                    };
                    self.device
                        .create_shader_module(wgpu::ShaderModuleDescriptor {
                            label: Some(op),
                            source: wgpu::ShaderSource::Wgsl(source.into()),
                        })
                })
                .clone()
        };
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&key),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: self.kernels.disk.as_ref().map(|d| &d.cache),
            });
        if let Some(d) = &self.kernels.disk {
            d.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            // A portable kernel only gets here through a bug in a shader or
            // its op file; a cooperative-matrix one also where the driver's
            // experimental support falls short.
            let message = format!("compiling kernel {key}: {e}");
            self.kernels
                .failed
                .lock()
                .expect("pipeline lock poisoned")
                .insert(key, message.clone());
            return Err(EngineError::Device(message));
        }
        let pipeline = Arc::new(pipeline);
        self.kernels
            .pipelines
            .lock()
            .expect("pipeline lock poisoned")
            .insert(key, pipeline.clone());
        Ok(pipeline)
    }

    /// Places `params` in this submission's uniform arena. The caller holds
    /// the stream lock from here until the dispatch is recorded, so that no
    /// flush can reuse the slot in between.
    fn uniform_slot(&self, u: &mut UniformArenas, params: &[u8]) -> (wgpu::Buffer, u64, u64) {
        let align = self.limits().min_uniform_buffer_offset_alignment as u64;
        let size = (params.len() as u64).max(16).div_ceil(16) * 16;
        let (mut arena, mut offset) = u.cursor;
        if offset + size > UNIFORM_ARENA_BYTES {
            arena += 1;
            offset = 0;
        }
        while u.buffers.len() <= arena {
            let b = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("motif params"),
                size: UNIFORM_ARENA_BYTES,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            u.buffers.push(b);
        }
        u.cursor = (arena, (offset + size).div_ceil(align) * align);
        let buffer = u.buffers[arena].clone();
        let mut padded = params.to_vec();
        padded.resize(size as usize, 0);
        self.queue.write_buffer(&buffer, offset, &padded);
        self.count_params(size);
        (buffer, offset, size)
    }

    /// Records one dispatch of `kernel` into the pending command stream.
    pub(crate) fn dispatch(
        &self,
        kernel: &Kernel,
        params: &[u8],
        bindings: &[(u32, Binding<'_>)],
        workgroups: [u32; 3],
    ) -> Result<()> {
        if !self.check_dispatch(kernel.op, bindings, workgroups)? {
            return Ok(());
        }
        let pipeline = self.pipeline(kernel)?;
        self.record_dispatch(
            &pipeline,
            kernel.op,
            kernel.entry,
            params,
            bindings,
            workgroups,
        );
        Ok(())
    }

    /// What every dispatch is checked for: bindings within the limit, a grid
    /// within the per-dimension limit. Ok(false): nothing to record (an
    /// empty grid, or a dry run).
    pub(crate) fn check_dispatch(
        &self,
        op: &'static str,
        bindings: &[(u32, Binding<'_>)],
        workgroups: [u32; 3],
    ) -> Result<bool> {
        for (_, b) in bindings {
            if b.size > self.max_binding_bytes() {
                return Err(EngineError::BindingTooLarge {
                    op,
                    bytes: b.size,
                    limit: self.max_binding_bytes(),
                });
            }
            debug_assert_eq!(
                b.offset % self.storage_offset_alignment(),
                0,
                "unaligned binding"
            );
        }
        let max = self.limits().max_compute_workgroups_per_dimension;
        if workgroups.iter().any(|&w| w > max) {
            return Err(EngineError::Argument {
                op,
                message: format!(
                    "dispatch of {workgroups:?} workgroups exceeds {max} per dimension"
                ),
            });
        }
        Ok(!workgroups.contains(&0) && !self.is_plan())
    }

    /// Records a checked dispatch of a compiled pipeline: `params` at binding
    /// 0 from the uniform arena, `bindings` at their slots, a compute pass of
    /// its own (timed as `kernel` while a GPU timer runs). For the kernels of
    /// the prelude ([`dispatch`](Self::dispatch)) and the cooperative-matrix
    /// ones, whose source carries its own directives (ops/coop.rs).
    pub(crate) fn record_dispatch(
        &self,
        pipeline: &wgpu::ComputePipeline,
        op: &'static str,
        kernel: &'static str,
        params: &[u8],
        bindings: &[(u32, Binding<'_>)],
        workgroups: [u32; 3],
    ) {
        let mut stream = self.stream.lock().expect("stream lock poisoned");
        let (ubuf, uoff, usize_) = self.uniform_slot(&mut stream.uniforms, params);
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &ubuf,
                offset: uoff,
                size: wgpu::BufferSize::new(usize_),
            }),
        }];
        for (slot, b) in bindings {
            entries.push(wgpu::BindGroupEntry {
                binding: *slot,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: b.buffer,
                    offset: b.offset,
                    size: wgpu::BufferSize::new(b.size.max(4)),
                }),
            });
        }
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(op),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let stream = &mut *stream;
        let timed = (stream.timer.as_mut()).and_then(|t| t.take_pair(&self.device, kernel));
        let timestamp_writes = stream.timer.as_ref().and_then(|t| t.writes(timed));
        let encoder = stream.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("motif ops"),
                })
        });
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(kernel),
            timestamp_writes,
        });
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(workgroups[0], workgroups[1], workgroups[2]);
    }

    /// Number of compiled pipelines (for `motif info` and tests of the cache).
    pub fn compiled_pipelines(&self) -> usize {
        self.kernels.pipeline_count()
    }
}
