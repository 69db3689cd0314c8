//! The GPU context: adapter choice, the device and its queue, the buffer pool,
//! the pipeline cache and the command stream that operators record into.
//!
//! Operators never submit on their own: every dispatch is recorded into one
//! pending command encoder, which is submitted when a caller reads a result
//! back ([`Gpu::flush`] or a download). A chain of operators therefore runs as
//! one submission with no CPU round trip.

mod adapter;
mod kernel;
mod pool;
pub mod tuning;

use std::sync::{Arc, Mutex};

pub use self::KernelTime as GpuKernelTime;
pub use adapter::AdapterSummary;
pub(crate) use kernel::{cache_dir, grid_1d, Binding, Kernel};
pub(crate) use pool::BlockPool;
pub(crate) use pool::BufferPool as PoolHandle;
pub use pool::PoolStats;

use crate::error::{EngineError, Result};

/// Element type of a tensor in GPU memory. Arithmetic is always f32; `F16`
/// only changes the storage (half the memory and bandwidth).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
}

impl DType {
    pub fn size_bytes(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(DType::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(DType::F16),
            other => Err(format!("unknown precision `{other}`: expected f16 or f32")),
        }
    }
}

/// The precision a run stores its tensors in.
pub type Precision = DType;

/// How to open the GPU. Every field has an environment variable so that tests
/// and scripts can steer the engine without flags.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// Adapter index or name substring (`MOTIF_ADAPTER`).
    pub adapter: Option<String>,
    /// Storage precision (`MOTIF_PRECISION`); default: f16 on real GPUs with
    /// SHADER_F16, f32 on CPU adapters.
    pub precision: Option<DType>,
    /// Lowers the largest storage binding below the adapter's, so that tests
    /// exercise the split path on small tensors (`MOTIF_MAX_BINDING_BYTES`).
    /// In plan mode it may also raise it: nothing is bound, so a plan can
    /// be made on this machine for an adapter with larger bindings (a CPU
    /// driver's 128 MiB stops a 14B transformer's attention).
    pub max_binding_bytes: Option<u64>,
    /// Dry run: tensors are accounted in the pool at their real size but
    /// get no memory, uploads and dispatches are validated and dropped, and
    /// downloads read zeros. Used to find the peak memory of a workload
    /// (`motif bench --plan`) and to check weight key maps without data.
    pub plan: bool,
    /// Fills every newly handed-out tensor with this byte (0xFF: NaN in f32
    /// and f16; 0x40: finite values near 3), so that an operator reading
    /// memory it did not write shows up instead of giving results that depend
    /// on what ran before (`MOTIF_POISON_POOL=nan|finite`).
    pub poison: Option<u8>,
    /// The folder for the compiled-pipeline cache; None: `MOTIF_CACHE_DIR`,
    /// else the user's cache folder + `motif` (see `DiskCache`).
    pub pipeline_cache: Option<std::path::PathBuf>,
    /// Leaves the tensor cores (cooperative matrices) off even where the
    /// adapter has them (`MOTIF_NO_COOP=1`).
    pub no_coop: bool,
    /// Routes attention to the tensor-core kernel by default, not only when
    /// asked for by name (`MOTIF_COOP_ATTENTION=1`): to measure it.
    pub coop_attention: bool,
    /// Ignores the tuning file (`motif bench --tune`) and routes every op
    /// by the built-in defaults (`MOTIF_TUNING=off`).
    pub no_tuning: bool,
}

/// Whether an on/off switch in the environment is on: set, not empty, not `0`.
fn env_on(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

impl GpuOptions {
    /// Fills unset fields from `MOTIF_ADAPTER`, `MOTIF_PRECISION`,
    /// `MOTIF_MAX_BINDING_BYTES`, `MOTIF_POISON_POOL` and the kernel switches
    /// (`MOTIF_NO_COOP`, `MOTIF_COOP_ATTENTION`,
    /// `MOTIF_TUNING`): the one place the engine reads them.
    pub fn with_env(mut self) -> Result<Self> {
        self.no_coop |= env_on("MOTIF_NO_COOP");
        self.coop_attention |= std::env::var("MOTIF_COOP_ATTENTION").is_ok_and(|v| v == "1");
        self.no_tuning |= std::env::var("MOTIF_TUNING").is_ok_and(|v| v == "off");
        match std::env::var("MOTIF_POISON_POOL").as_deref() {
            Ok("nan") => self.poison = Some(0xFF),
            Ok("finite") => self.poison = Some(0x40),
            _ => {}
        }
        if self.adapter.is_none() {
            self.adapter = std::env::var("MOTIF_ADAPTER")
                .ok()
                .filter(|s| !s.is_empty());
        }
        if self.precision.is_none() {
            if let Ok(p) = std::env::var("MOTIF_PRECISION") {
                if !p.is_empty() {
                    self.precision = Some(p.parse().map_err(|m| EngineError::Argument {
                        op: "MOTIF_PRECISION",
                        message: m,
                    })?);
                }
            }
        }
        if self.max_binding_bytes.is_none() {
            if let Ok(v) = std::env::var("MOTIF_MAX_BINDING_BYTES") {
                if !v.is_empty() {
                    self.max_binding_bytes =
                        Some(v.parse().map_err(|_| EngineError::Argument {
                            op: "MOTIF_MAX_BINDING_BYTES",
                            message: format!("expected a byte count, found `{v}`"),
                        })?);
                }
            }
        }
        Ok(self)
    }
}

/// The commands recorded since the last submission, and the parameter
/// blocks they use. One lock guards both: a parameter slot must not be
/// reused by another thread's dispatch before its own dispatch is submitted.
#[derive(Default)]
pub(crate) struct Stream {
    pub(crate) encoder: Option<wgpu::CommandEncoder>,
    pub(crate) uniforms: kernel::UniformArenas,
    /// While a GPU timer runs, every dispatch writes a begin and an end timestamp.
    pub(crate) timer: Option<GpuTimer>,
}

/// Timestamp queries around every dispatch between [`Gpu::start_timer`] and
/// [`Gpu::stop_timer`], with the name of each dispatch's kernel.
pub(crate) struct GpuTimer {
    /// Query sets of [`GpuTimer::SET_QUERIES`] each, added as dispatches
    /// come (wgpu caps one set at 4096 queries).
    pub(crate) sets: Vec<wgpu::QuerySet>,
    /// The kernel of each timed dispatch, in query-pair order.
    labels: Vec<&'static str>,
    /// Dispatches that found no free query pair: a sum would undercount.
    missed: u32,
}

impl GpuTimer {
    const SET_QUERIES: u32 = 4096;
    /// At most this many dispatches are timed (a UNet step at full size
    /// takes a few thousand).
    const MAX_PAIRS: usize = 32768;

    /// The query set and pass timestamp index for the next dispatch, if
    /// room is left.
    pub(crate) fn take_pair(
        &mut self,
        device: &wgpu::Device,
        label: &'static str,
    ) -> Option<(usize, u32)> {
        if self.labels.len() >= Self::MAX_PAIRS {
            self.missed += 1;
            return None;
        }
        let pair = self.labels.len() as u32;
        let per_set = Self::SET_QUERIES / 2;
        let (set, index) = ((pair / per_set) as usize, (pair % per_set) * 2);
        if set == self.sets.len() {
            self.sets
                .push(device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("motif timer"),
                    ty: wgpu::QueryType::Timestamp,
                    count: Self::SET_QUERIES,
                }));
        }
        self.labels.push(label);
        Some((set, index))
    }

    /// The pass timestamp writes of a dispatch given a pair by [`take_pair`](Self::take_pair).
    pub(crate) fn writes(
        &self,
        pair: Option<(usize, u32)>,
    ) -> Option<wgpu::ComputePassTimestampWrites<'_>> {
        pair.map(|(set, i)| wgpu::ComputePassTimestampWrites {
            query_set: &self.sets[set],
            beginning_of_pass_write_index: Some(i),
            end_of_pass_write_index: Some(i + 1),
        })
    }
}

/// GPU time of the dispatches of one kernel, from [`Gpu::stop_timer_by_kernel`].
#[derive(Debug, Clone, PartialEq)]
pub struct KernelTime {
    pub kernel: String,
    pub seconds: f64,
    pub dispatches: u32,
}

impl Stream {
    pub(crate) fn encoder(&mut self, device: &wgpu::Device) -> &mut wgpu::CommandEncoder {
        self.encoder.get_or_insert_with(|| {
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("motif ops"),
            })
        })
    }
}

/// Host ↔ device copies of tensor data since the GPU opened: uploads
/// ([`Tensor::from_f32`](crate::tensor::Tensor::from_f32) and kin) and
/// downloads (`to_f32`, previews read back), each with its bytes, and the
/// parameter blocks written for dispatches (a few hundred bytes each). The
/// step loops are meant to move no latent-sized data between the CPU and
/// the GPU; tests count these around a generation to hold them to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferStats {
    pub uploads: u64,
    pub upload_bytes: u64,
    /// Each upload's size, largest so far.
    pub largest_upload: u64,
    pub downloads: u64,
    pub download_bytes: u64,
    pub largest_download: u64,
    pub param_writes: u64,
    pub param_bytes: u64,
}

impl TransferStats {
    /// What happened between `earlier` and `self` (the largest sizes are
    /// those since the GPU opened: reset them with [`Gpu::reset_transfer_stats`]).
    pub fn since(&self, earlier: &TransferStats) -> TransferStats {
        TransferStats {
            uploads: self.uploads - earlier.uploads,
            upload_bytes: self.upload_bytes - earlier.upload_bytes,
            largest_upload: self.largest_upload,
            downloads: self.downloads - earlier.downloads,
            download_bytes: self.download_bytes - earlier.download_bytes,
            largest_download: self.largest_download,
            param_writes: self.param_writes - earlier.param_writes,
            param_bytes: self.param_bytes - earlier.param_bytes,
        }
    }
}

/// Errors reported by wgpu outside any call, kept until the next flush.
#[derive(Default)]
struct ErrorSink {
    first: Option<EngineError>,
    lost: Option<String>,
}

/// An open GPU: device, queue, pool, pipelines and the pending commands.
pub struct Gpu {
    instance: wgpu::Instance,
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    adapter: wgpu::Adapter,
    summary: AdapterSummary,
    limits: wgpu::Limits,
    features: wgpu::Features,
    precision: DType,
    max_binding_bytes: u64,
    pub(crate) pool: Arc<PoolHandle>,
    pub(crate) blocks: Arc<BlockPool>,
    pub(crate) kernels: kernel::KernelCache,
    pub(crate) stream: Mutex<Stream>,
    errors: Arc<Mutex<ErrorSink>>,
    submissions: std::sync::atomic::AtomicU64,
    transfers: Mutex<TransferStats>,
    plan: bool,
    pub(crate) poison: Option<u8>,
    coop: Option<CoopConfig>,
    /// The options it was opened with, environment switches read in.
    options: GpuOptions,
    /// The per-adapter tuning file's choices (`motif bench --tune`); empty
    /// where there is none. Replaced only by the tuner, between its trials.
    tuning: std::sync::RwLock<tuning::Tuning>,
}

/// The cooperative-matrix (tensor core) configuration Motif uses: f16
/// operands, f32 accumulators, 16 x 16 x 16 tiles, one subgroup of a fixed
/// size per tile operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoopConfig {
    /// Invocations per subgroup (the adapter's one subgroup size).
    pub subgroup_size: u32,
    /// Square f16 x f16 -> f32 fragment sizes offered: 16, and 8 where the
    /// adapter also has 8 x 8 x 8 (ops/matmul_coop.rs's variants).
    pub fragments: Vec<u32>,
    /// Every configuration the adapter reports, as `MxNxK ab->cr`.
    pub reported: Vec<String>,
}

/// The cooperative-matrix configuration to use on `adapter`, or `None`
/// when it has none that Motif's kernel can run (or `no_coop`).
/// The kernel needs f16 x f16 -> f32 in 16 x 16 x 16 tiles, and a fixed
/// subgroup size so that a workgroup splits into a known number of
/// subgroups.
fn coop_config(
    adapter: &wgpu::Adapter,
    features: wgpu::Features,
    no_coop: bool,
) -> Option<CoopConfig> {
    if no_coop {
        return None;
    }
    if !adapter
        .features()
        .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
        || !features.contains(wgpu::Features::SHADER_F16)
    {
        return None;
    }
    use wgpu::CooperativeScalarType as S;
    let props = adapter.cooperative_matrix_properties();
    let reported = props
        .iter()
        .map(|p| {
            format!(
                "{}x{}x{} {:?}->{:?}",
                p.m_size, p.n_size, p.k_size, p.ab_type, p.cr_type
            )
        })
        .collect();
    let fragments: Vec<u32> = [16, 8]
        .into_iter()
        .filter(|&f| {
            props.iter().any(|p| {
                (p.m_size, p.n_size, p.k_size, p.ab_type, p.cr_type) == (f, f, f, S::F16, S::F32)
            })
        })
        .collect();
    let usable = fragments.contains(&16);
    let info = adapter.get_info();
    let fixed = info.subgroup_min_size == info.subgroup_max_size;
    (usable && fixed && info.subgroup_max_size >= 1).then_some(CoopConfig {
        subgroup_size: info.subgroup_max_size,
        fragments,
        reported,
    })
}

impl Drop for Gpu {
    fn drop(&mut self) {
        self.save_pipeline_cache();
    }
}

/// Lists the adapters wgpu can see, in enumeration order.
pub fn list_adapters() -> Vec<AdapterSummary> {
    let instance = new_instance();
    let adapters = pollster::block_on(instance.enumerate_adapters(adapter::backends()));
    adapters
        .iter()
        .enumerate()
        .map(|(i, a)| adapter::summarize(i, a))
        .collect()
}

fn new_instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = adapter::backends();
    wgpu::Instance::new(desc)
}

impl Gpu {
    /// Opens the adapter chosen by `options` (see [`GpuOptions`]).
    pub fn new(options: GpuOptions) -> Result<Self> {
        let options = options.with_env()?;
        let instance = new_instance();
        let adapters = pollster::block_on(instance.enumerate_adapters(adapter::backends()));
        let index_of = |a: &wgpu::Adapter| {
            let info = a.get_info();
            adapters
                .iter()
                .position(|b| b.get_info() == info)
                .unwrap_or(0)
        };
        let all: Vec<_> = adapters.clone();
        let chosen = adapter::choose(all, options.adapter.as_deref())?;
        let summary = adapter::summarize(index_of(&chosen), &chosen);

        let wanted =
            wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY;
        let mut features = chosen.features() & wanted;
        let coop = coop_config(&chosen, features, options.no_coop);
        if coop.is_some() {
            features |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        // Raise every limit to what the adapter allows: the networks need
        // large storage bindings and many bindings per kernel.
        let limits = chosen.limits();
        // Compiled pipelines kept on disk between runs, where the backend can.
        let features = features | (chosen.features() & wgpu::Features::PIPELINE_CACHE);

        let precision = match options.precision {
            Some(DType::F16) if !features.contains(wgpu::Features::SHADER_F16) => {
                return Err(EngineError::F16Unsupported {
                    adapter: summary.name.clone(),
                })
            }
            Some(p) => p,
            None if features.contains(wgpu::Features::SHADER_F16) && !summary.is_cpu => DType::F16,
            None => DType::F32,
        };

        let request = |features: wgpu::Features, experimental: bool| {
            pollster::block_on(chosen.request_device(&wgpu::DeviceDescriptor {
                label: Some("motif"),
                required_features: features,
                required_limits: limits.clone(),
                experimental_features: if experimental {
                    // SAFETY (wgpu's contract for experimental features): they
                    // are only used by the cooperative-matrix kernels (ops/coop.rs),
                    // and MOTIF_NO_COOP=1 leaves them off.
                    unsafe { wgpu::ExperimentalFeatures::enabled() }
                } else {
                    wgpu::ExperimentalFeatures::disabled()
                },
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            }))
        };
        // An experimental feature must never cost the device: if asking for
        // it fails, ask again without it.
        let (device, queue, features, coop) = match request(features, coop.is_some()) {
            Ok((d, q)) => (d, q, features, coop),
            Err(_) if coop.is_some() => {
                let plain = features - wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
                let (d, q) = request(plain, false).map_err(|e| EngineError::DeviceRequest {
                    adapter: summary.name.clone(),
                    reason: e.to_string(),
                })?;
                (d, q, plain, None)
            }
            Err(e) => {
                return Err(EngineError::DeviceRequest {
                    adapter: summary.name.clone(),
                    reason: e.to_string(),
                })
            }
        };

        let errors = Arc::new(Mutex::new(ErrorSink::default()));
        {
            let sink = errors.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                let mut s = sink.lock().expect("error sink lock poisoned");
                if s.first.is_none() {
                    s.first = Some(match e {
                        wgpu::Error::OutOfMemory { .. } => EngineError::OutOfMemory(e.to_string()),
                        other => EngineError::Device(other.to_string()),
                    });
                }
            }));
            let sink = errors.clone();
            device.set_device_lost_callback(move |reason, message| {
                if reason != wgpu::DeviceLostReason::Destroyed {
                    sink.lock().expect("error sink lock poisoned").lost =
                        Some(format!("{reason:?}: {message}"));
                }
            });
        }

        let adapter_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let max_binding_bytes = match options.max_binding_bytes {
            Some(v) => {
                let align = limits.min_storage_buffer_offset_alignment as u64;
                if v < 4 * align {
                    return Err(EngineError::Argument {
                        op: "max_binding_bytes",
                        message: format!(
                            "{v} is below the smallest useful binding ({} bytes)",
                            4 * align
                        ),
                    });
                }
                // A plan dispatches nothing: it may take a larger adapter's
                // limit, to count a workload as that adapter would split it.
                match options.plan {
                    true => v / 4 * 4,
                    false => v.min(adapter_binding) / 4 * 4,
                }
            }
            None => adapter_binding / 4 * 4,
        };

        let kernels = kernel::KernelCache {
            disk: kernel::DiskCache::open(
                &device,
                &chosen.get_info(),
                features,
                options.pipeline_cache.clone(),
            ),
            ..Default::default()
        };
        let tuning = if options.no_tuning {
            tuning::Tuning::default()
        } else {
            tuning::Tuning::load_for(&chosen.get_info(), options.pipeline_cache.clone())?
        };
        Ok(Gpu {
            instance,
            device,
            queue,
            adapter: chosen,
            summary,
            limits,
            features,
            precision,
            max_binding_bytes,
            pool: Arc::new(PoolHandle::default()),
            blocks: Arc::new(BlockPool::default()),
            kernels,
            stream: Mutex::new(Stream::default()),
            errors,
            submissions: Default::default(),
            transfers: Default::default(),
            plan: options.plan,
            poison: options.poison,
            coop,
            tuning: std::sync::RwLock::new(tuning),
            options,
        })
    }

    /// The wgpu instance, adapter, device and queue this context runs on, for
    /// a window that draws on the same device (the viewer): it creates its
    /// surface from the instance and renders with the device and queue.
    pub fn wgpu_handles(&self) -> (wgpu::Instance, wgpu::Adapter, wgpu::Device, wgpu::Queue) {
        (
            self.instance.clone(),
            self.adapter.clone(),
            self.device.clone(),
            self.queue.clone(),
        )
    }

    pub fn adapter(&self) -> &AdapterSummary {
        &self.summary
    }

    pub fn adapter_info(&self) -> wgpu::AdapterInfo {
        self.adapter.get_info()
    }

    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// The optional features Motif asked for and got.
    pub fn features(&self) -> wgpu::Features {
        self.features
    }

    /// The tensor-core configuration the cooperative-matrix matmul runs
    /// with, if the adapter has one (see `ops::matmul_coop`).
    pub fn coop_matrix(&self) -> Option<&CoopConfig> {
        self.coop.as_ref()
    }

    /// The options this context was opened with, environment switches read
    /// in ([`GpuOptions::with_env`]).
    pub fn options(&self) -> &GpuOptions {
        &self.options
    }

    /// The kernel choices routing follows (ops/route.rs): the tuning file
    /// read when the GPU opened, or what [`set_tuning`](Self::set_tuning) put.
    pub fn tuning(&self) -> tuning::Tuning {
        self.tuning.read().expect("tuning lock poisoned").clone()
    }

    /// Routes by `tuning` from now on (the tuner, trying each variant
    /// through the same routing the models take).
    pub fn set_tuning(&self, tuning: tuning::Tuning) {
        *self.tuning.write().expect("tuning lock poisoned") = tuning;
    }

    /// The tuned variant of `op` for `class`, if any.
    pub(crate) fn tuned(&self, op: &str, class: &str) -> Option<tuning::Variant> {
        let tuning = self.tuning.read().expect("tuning lock poisoned");
        tuning.choice(op, class).cloned()
    }

    pub fn has_f16(&self) -> bool {
        self.features.contains(wgpu::Features::SHADER_F16)
    }

    /// The storage precision of this run.
    pub fn precision(&self) -> DType {
        self.precision
    }

    /// The largest storage binding an operator may use (the adapter's, or the
    /// lower value set in [`GpuOptions::max_binding_bytes`]).
    pub fn max_binding_bytes(&self) -> u64 {
        self.max_binding_bytes
    }

    /// The largest single buffer (one tensor) the adapter can allocate.
    pub fn max_buffer_bytes(&self) -> u64 {
        self.limits.max_buffer_size
    }

    pub(crate) fn storage_offset_alignment(&self) -> u64 {
        self.limits.min_storage_buffer_offset_alignment as u64
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    pub fn reset_peak_memory(&self) {
        self.pool.reset_peaks();
    }

    /// Writes the compiled pipelines to the disk cache now (it is also
    /// written when the GPU closes).
    pub fn save_pipeline_cache(&self) {
        if let Some(d) = &self.kernels.disk {
            d.save();
        }
    }

    /// The pipeline cache file of this adapter, where there is one.
    pub fn pipeline_cache_path(&self) -> Option<&std::path::Path> {
        self.kernels.disk.as_ref().map(|d| d.path())
    }

    /// Returns the pool's free buffers to the driver.
    pub fn trim_pool(&self) {
        self.pool.trim();
        self.blocks.trim();
    }

    /// Number of queue submissions so far: a chain of operators followed by
    /// one download is one submission.
    pub fn submissions(&self) -> u64 {
        self.submissions.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The host ↔ device copies so far (see [`TransferStats`]).
    pub fn transfer_stats(&self) -> TransferStats {
        *self.transfers.lock().expect("transfer stats lock poisoned")
    }

    /// Zeroes the counts of [`Gpu::transfer_stats`].
    pub fn reset_transfer_stats(&self) {
        *self.transfers.lock().expect("transfer stats lock poisoned") = TransferStats::default();
    }

    fn count_transfer(&self, update: impl FnOnce(&mut TransferStats)) {
        update(&mut self.transfers.lock().expect("transfer stats lock poisoned"));
    }

    pub(crate) fn count_params(&self, bytes: u64) {
        self.count_transfer(|t| {
            t.param_writes += 1;
            t.param_bytes += bytes;
        });
    }

    /// Fails with the first error wgpu reported since the last check.
    pub(crate) fn check_errors(&self) -> Result<()> {
        let mut s = self.errors.lock().expect("error sink lock poisoned");
        if let Some(lost) = &s.lost {
            return Err(EngineError::DeviceLost(lost.clone()));
        }
        match s.first.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Runs `record` on the pending encoder (created on first use).
    pub(crate) fn record<R>(&self, record: impl FnOnce(&mut wgpu::CommandEncoder) -> R) -> R {
        let mut stream = self.stream.lock().expect("stream lock poisoned");
        record(stream.encoder(&self.device))
    }

    /// Submits everything recorded so far as one submission (does not wait).
    pub fn flush(&self) -> Result<()> {
        {
            let mut stream = self.stream.lock().expect("stream lock poisoned");
            if let Some(encoder) = stream.encoder.take() {
                self.queue.submit(Some(encoder.finish()));
                self.submissions
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            stream.uniforms.reset();
        }
        self.check_errors()
    }

    /// Starts timing every dispatch on the GPU itself (needs TIMESTAMP_QUERY;
    /// returns false without it). Used by `motif bench`.
    pub fn start_timer(&self) -> bool {
        if !self.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            return false;
        }
        let mut stream = self.stream.lock().expect("stream lock poisoned");
        stream.timer = Some(GpuTimer {
            sets: Vec::new(),
            labels: Vec::new(),
            missed: 0,
        });
        true
    }

    /// Stops the timer and returns the summed GPU time of the timed
    /// dispatches in seconds, and how many were timed (waits for the GPU);
    /// None if some dispatches could not be timed (more than the timer holds).
    pub fn stop_timer(&self) -> Result<Option<(f64, u32)>> {
        Ok(self.stop_timer_by_kernel()?.map(|kernels| {
            kernels
                .iter()
                .fold((0.0, 0), |(s, n), k| (s + k.seconds, n + k.dispatches))
        }))
    }

    /// [`stop_timer`](Self::stop_timer) per kernel (the entry point's name),
    /// slowest first.
    pub fn stop_timer_by_kernel(&self) -> Result<Option<Vec<KernelTime>>> {
        let timer = self
            .stream
            .lock()
            .expect("stream lock poisoned")
            .timer
            .take();
        let Some(timer) = timer else { return Ok(None) };
        // More dispatches than query pairs: no honest sum exists, and the
        // caller falls back to the wall clock.
        if timer.missed > 0 {
            return Ok(None);
        }
        let per_set = GpuTimer::SET_QUERIES / 2;
        let mut ticks: Vec<u64> = Vec::with_capacity(timer.labels.len() * 2);
        for (set, queries) in timer.sets.iter().enumerate() {
            let pairs = (timer.labels.len() as u32 - set as u32 * per_set).min(per_set);
            let bytes = pairs as u64 * 16;
            let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("motif timer resolve"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            self.record(|enc| enc.resolve_query_set(queries, 0..pairs * 2, &resolve, 0));
            let raw = self.read(&resolve, 0, bytes)?;
            ticks.extend(bytemuck::pod_collect_to_vec::<u8, u64>(&raw));
        }
        let period_ns = self.queue.get_timestamp_period() as f64;
        let mut kernels: Vec<KernelTime> = Vec::new();
        for (label, pair) in timer.labels.iter().zip(ticks.chunks(2)) {
            let seconds = pair[1].saturating_sub(pair[0]) as f64 * period_ns * 1e-9;
            match kernels.iter_mut().find(|k| k.kernel == *label) {
                Some(k) => {
                    k.seconds += seconds;
                    k.dispatches += 1;
                }
                None => kernels.push(KernelTime {
                    kernel: label.to_string(),
                    seconds,
                    dispatches: 1,
                }),
            }
        }
        kernels.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        Ok(Some(kernels))
    }

    /// Submits pending work and blocks until the GPU has finished it.
    pub fn synchronize(&self) -> Result<()> {
        self.flush()?;
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| EngineError::Device(e.to_string()))?;
        self.check_errors()
    }

    /// True in a dry run (see [`GpuOptions::plan`]).
    pub fn is_plan(&self) -> bool {
        self.plan
    }

    /// Allocates a storage buffer of at least `bytes` from the pool, and
    /// returns it with its size class.
    pub(crate) fn alloc(&self, bytes: u64) -> Result<(wgpu::Buffer, u64)> {
        if bytes > self.limits.max_buffer_size {
            return Err(EngineError::BufferTooLarge {
                bytes,
                limit: self.limits.max_buffer_size,
            });
        }
        let (reused, class) = self.pool.take(bytes);
        if let Some(b) = reused {
            return Ok((b, class));
        }
        let class = class.min(self.limits.max_buffer_size / 4 * 4);
        if self.plan {
            let stand_in = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("motif plan stand-in"),
                size: 4,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            self.pool.record_created(class);
            return Ok((stand_in, class));
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("motif tensor"),
            size: class,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(EngineError::OutOfMemory(format!(
                "allocating {class} bytes: {e}"
            )));
        }
        self.pool.record_created(class);
        Ok((buffer, class))
    }

    /// Copies `bytes` into `buffer` at `offset` in stream order: the copy is
    /// recorded after every operator recorded so far, so a recycled buffer is
    /// never overwritten before earlier readers ran.
    pub(crate) fn write(&self, buffer: &wgpu::Buffer, offset: u64, bytes: &[u8]) {
        if bytes.is_empty() || self.plan {
            return;
        }
        let n = bytes.len() as u64;
        self.count_transfer(|t| {
            t.uploads += 1;
            t.upload_bytes += n;
            t.largest_upload = t.largest_upload.max(n);
        });
        let padded = (bytes.len() as u64).div_ceil(4) * 4;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("motif upload"),
            size: padded,
            usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::MAP_WRITE,
            mapped_at_creation: true,
        });
        {
            let mut padded_bytes = bytes.to_vec();
            padded_bytes.resize(padded as usize, 0);
            let mut view = staging
                .slice(..)
                .get_mapped_range_mut()
                .expect("a buffer created mapped can be viewed");
            view.copy_from_slice(&padded_bytes);
        }
        staging.unmap();
        self.record(|enc| enc.copy_buffer_to_buffer(&staging, 0, buffer, offset, padded));
    }

    /// Fills `size` bytes of `buffer` with zeros, in stream order.
    pub(crate) fn clear(&self, buffer: &wgpu::Buffer, offset: u64, size: u64) {
        if self.plan {
            return;
        }
        self.record(|enc| enc.clear_buffer(buffer, offset, Some(size)));
    }

    /// Reads `size` bytes at `offset` back to the CPU: submits all pending
    /// work and waits for it.
    pub(crate) fn read(&self, buffer: &wgpu::Buffer, offset: u64, size: u64) -> Result<Vec<u8>> {
        if size == 0 {
            return Ok(Vec::new());
        }
        if self.plan {
            return Ok(vec![0; size as usize]);
        }
        self.count_transfer(|t| {
            t.downloads += 1;
            t.download_bytes += size;
            t.largest_download = t.largest_download.max(size);
        });
        let padded = size.div_ceil(4) * 4;
        let readback = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("motif download"),
            size: padded,
            usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
            mapped_at_creation: false,
        });
        self.record(|enc| enc.copy_buffer_to_buffer(buffer, offset, &readback, 0, padded));
        self.flush()?;
        let (tx, rx) = std::sync::mpsc::channel();
        readback.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| EngineError::Device(e.to_string()))?;
        self.check_errors()?;
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(EngineError::Device(format!(
                    "mapping a download buffer: {e}"
                )))
            }
            Err(_) => return Err(EngineError::Device("download was never mapped".into())),
        }
        let bytes = readback
            .slice(..)
            .get_mapped_range()
            .map_err(|e| EngineError::Device(format!("viewing a download buffer: {e}")))?
            [..size as usize]
            .to_vec();
        readback.unmap();
        Ok(bytes)
    }
}
