//! Fused scaled dot-product attention: one dispatch with an online softmax,
//! so the [Lq, Lk] score matrix never exists in memory (memory is O(L)).
//! Serves SD's spatial self-attention (4096 tokens at 512x512),
//! cross-attention on CLIP's 77 tokens, the motion modules' attention over
//! 16-32 frames and CLIP's causal self-attention. Two portable kernels,
//! picked by adapter in `choose_kernel`: a tiled one for GPUs
//! (`shaders/attention.wgsl`) and a subgroup one for CPU adapters
//! (`shaders/attention_subgroup.wgsl`, a template expanded per head dim);
//! and flash attention on tensor cores (ops/attention_coop.rs) where
//! routing (ops/route.rs) sends it. Inputs larger than one storage binding
//! are processed in windows of batch items; on CPU adapters, key ranges
//! longer than llvmpipe's loop limit allows run as several passes.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use bytemuck::{Pod, Zeroable};

use super::attention_coop::{self, FlashVariant};
use super::coop::CoopKernel;
use super::norm::CPU_LOOP_BUDGET;
use super::route::{self, Route};
use super::{check_dtypes, check_rank, params_bytes, windows};
use crate::error::{EngineError, Result};
use crate::gpu::tuning::KernelName;
use crate::gpu::{Gpu, Kernel};
use crate::tensor::{fmt_shape, DType, Tensor};

/// Whether `gpu` runs the tensor-core attention on `dtype` at `head_dim`
/// (any of its variants; for tests, the tuner and `motif bench --coop`).
#[doc(hidden)]
pub fn coop_supported(gpu: &Gpu, dtype: DType, head_dim: usize) -> bool {
    !attention_coop::coop_variants(gpu, dtype, head_dim).is_empty()
}

/// The tensor-core variant routing may pick for `head_dim`: the one the
/// tuning file names for the class (`tuned`), else the adapter's default;
/// None where none runs here. A tuned choice that names no variant of the
/// template, or one that does not fit this adapter, is the file's error.
fn coop_choice(
    gpu: &Gpu,
    dtype: DType,
    head_dim: usize,
    class: &str,
    tuned: Option<std::collections::BTreeMap<String, f64>>,
) -> Result<Option<(CoopKernel, FlashVariant)>> {
    let here = attention_coop::coop_variants(gpu, dtype, head_dim);
    let Some(config) = gpu.coop_matrix().filter(|_| !here.is_empty()) else {
        return Ok(None);
    };
    let variant = match tuned {
        None => match here.first() {
            Some(v) => *v,
            None => return Ok(None),
        },
        Some(constants) => match FlashVariant::from_constants(&constants) {
            Some(v) if here.contains(&v) => v,
            _ => {
                return Err(EngineError::BadTuningFile {
                    path: gpu.tuning().path.unwrap_or_default(),
                    reason: format!(
                        "attention class `{class}`: {constants:?} names no tensor-core variant \
                         of head dim {head_dim} that runs here"
                    ),
                })
            }
        },
    };
    let subgroup = config.subgroup_size as usize;
    Ok(Some((
        attention_coop::coop_kernel(variant, head_dim, subgroup),
        variant,
    )))
}

const SOURCE: &str = include_str!("../../../shaders/attention.wgsl");
/// A template, expanded per head dim and slot layout by [`subgroup_kernel`].
const SUBGROUP_TEMPLATE: &str = include_str!("../../../shaders/attention_subgroup.wgsl");
/// The largest head dim the kernels hold (SD 1.5's deepest blocks use 160);
/// mirrors `MAX_D4` of attention.wgsl.
pub const MAX_HEAD_DIM: usize = 160;
/// Mirrors `TILE_KEYS` of attention.wgsl.
const TILE_KEYS: usize = 8;

/// The variants of the kernel, one per kind of adapter; see the shaders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    /// One invocation per query; k and v staged in workgroup memory 8 keys at
    /// a time (`shaders/attention.wgsl`). Runs on any adapter.
    Tiled,
    /// 8 lanes share every k/v load through subgroup broadcasts, each lane
    /// owning up to 8 queries in registers (`shaders/attention_subgroup.wgsl`).
    /// For CPU adapters; needs subgroups of at least 8 lanes.
    Subgroup,
    /// Flash attention on tensor cores through cooperative matrices
    /// (`shaders/attention_coop.wgsl`, ops/attention_coop.rs): f16, head
    /// dims up to 160, adapters with the cooperative matrices ops/coop.rs
    /// checks for; the variant the tuning file names, else the adapter's
    /// default. Only when asked for, tuned (`motif bench --tune`) or with
    /// MOTIF_COOP_ATTENTION=1: untuned it is not known to beat `Tiled`.
    Coop,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct AttentionOptions {
    /// Query i sees keys j <= i only (CLIP's text encoder).
    pub causal: bool,
    /// Score scale; `None` is 1/sqrt(head_dim).
    pub scale: Option<f32>,
    /// Forces a kernel variant; `None` picks the one for the adapter.
    pub kernel: Option<AttentionKernel>,
    /// Caps the keys one dispatch walks; longer key ranges run as several
    /// passes that carry the softmax state. `None`: as the adapter needs.
    pub max_keys_per_pass: Option<usize>,
    /// Head dims above [`MAX_HEAD_DIM`] materialise the scores a block of
    /// queries at a time; this caps the query rows of a block. `None`: as
    /// many as fit one binding and about 256 MiB.
    pub max_query_rows: Option<usize>,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    lq: u32,
    lk: u32,
    stride: u32,
    causal: u32,
    q_off: u32,
    k_off: u32,
    v_off: u32,
    out_off: u32,
    scale_log2: f32,
    key_start: u32,
    key_end: u32,
    heads: u32,
    _pad: [u32; 4],
}

/// The variants this adapter can run.
pub fn available_kernels(gpu: &Gpu, dtype: DType) -> Vec<AttentionKernel> {
    let mut kernels = Vec::new();
    let tile_bytes = 2 * TILE_KEYS * MAX_HEAD_DIM * dtype.size_bytes() as usize;
    if gpu.limits().max_compute_workgroup_storage_size as usize >= tile_bytes {
        kernels.push(AttentionKernel::Tiled);
    }
    // The subgroup kernel broadcasts from lanes 0..7 of an 8-lane workgroup.
    if gpu.features().contains(wgpu::Features::SUBGROUP)
        && gpu.adapter_info().subgroup_min_size >= 8
    {
        kernels.push(AttentionKernel::Subgroup);
    }
    kernels
}

/// The variant for this adapter. llvmpipe issues one scalar load per lane for
/// every storage or workgroup-memory load, even of an address all lanes
/// share, so on CPU adapters the subgroup kernel, which loads each k/v value
/// once per 8 lanes x 8 queries, is the fast one; on GPUs the tiled kernel's
/// shared tiles do that job without subgroups.
fn choose_kernel(gpu: &Gpu, dtype: DType) -> Option<AttentionKernel> {
    let available = available_kernels(gpu, dtype);
    let preferred = if gpu.adapter().is_cpu {
        [AttentionKernel::Subgroup, AttentionKernel::Tiled]
    } else {
        [AttentionKernel::Tiled, AttentionKernel::Subgroup]
    };
    preferred.into_iter().find(|k| available.contains(k))
}

/// How a variant is compiled and dispatched for one problem.
struct Launch {
    op: &'static str,
    source: &'static str,
    dtype: DType,
    constants: Vec<(&'static str, f64)>,
    /// Queries per workgroup.
    queries: usize,
    /// Loop iterations per invocation: (per key, fixed), for the pass split.
    loop_cost: (f64, usize),
}

fn launch(variant: AttentionKernel, dtype: DType, head_dim: usize, lq: usize) -> Launch {
    let d4 = head_dim.div_ceil(4);
    match variant {
        // Coop never gets here: attention() dispatches it itself, and
        // available_kernels (the portable ones) never lists it.
        AttentionKernel::Tiled | AttentionKernel::Coop => {
            let wg_q = if lq <= 16 { 16 } else { 64 };
            // Per tile: the tile loop, its load loop and two d4 loops; then
            // loading q and the state, storing the state or the output.
            let per_tile = 1 + 2 * d4 + (TILE_KEYS * d4).div_ceil(wg_q);
            Launch {
                op: "attention",
                source: SOURCE,
                dtype,
                constants: vec![("HEAD_DIM", head_dim as f64), ("WG_Q", wg_q as f64)],
                queries: wg_q,
                loop_cost: (per_tile as f64 / TILE_KEYS as f64, 4 * d4 + MAX_HEAD_DIM),
            }
        }
        AttentionKernel::Subgroup => {
            // Queries per lane, in groups of `width`: each k/v value is loaded
            // once per 8 lanes x slots, so more is faster; but llvmpipe's
            // compile time grows steeply with the registers they hold (8 slots
            // at head dim 160: over 2 minutes), so slots x head dim stays at
            // most 320. SD's head dims of 80 and 160 come with short
            // sequences, and short sequences (the motion modules' 16 frames)
            // waste fewer slots with fewer.
            let by_head_dim = match head_dim {
                0..=40 => 8,
                41..=80 => 4,
                _ => 2,
            };
            let slots = lq.div_ceil(8).next_power_of_two().clamp(2, by_head_dim);
            let (groups, width) = if slots == 8 { (2, 4) } else { (1, slots) };
            let (op, source) = subgroup_kernel(head_dim, groups, width);
            Launch {
                op,
                source,
                dtype,
                constants: Vec::new(),
                queries: 8 * groups * width,
                // The key loop is the shader's only loop.
                loop_cost: (1.0, 0),
            }
        }
    }
}

impl Launch {
    /// The pipeline for one pass of several (or the only one): the first
    /// starts from nothing, the last writes the output.
    fn kernel(&self, first: bool, last: bool) -> Kernel {
        let mut constants = self.constants.clone();
        constants.push(("FIRST_PASS", f64::from(u8::from(first))));
        constants.push(("LAST_PASS", f64::from(u8::from(last))));
        Kernel {
            op: self.op,
            source: self.source,
            entry: "attention",
            dtype: self.dtype,
            constants,
        }
    }
}

/// The subgroup kernel for one head dim and slot layout: the template
/// expanded, with its own op name (the pipeline cache keeps one module per
/// op). Each distinct kernel is built once and kept for the process's life.
fn subgroup_kernel(head_dim: usize, groups: usize, width: usize) -> (&'static str, &'static str) {
    type Built = HashMap<(usize, usize, usize), (&'static str, &'static str)>;
    static BUILT: OnceLock<Mutex<Built>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .expect("attention kernel cache lock poisoned");
    *built.entry((head_dim, groups, width)).or_insert_with(|| {
        let op = format!("attention_subgroup_d{head_dim}_g{groups}_w{width}");
        let source = expand_template(SUBGROUP_TEMPLATE, head_dim, groups, width);
        (
            Box::leak(op.into_boxed_str()),
            Box::leak(source.into_boxed_str()),
        )
    })
}

/// Expands the `//#for NAME in RANGE` ... `//#end` blocks and `{name}`
/// placeholders of the subgroup template (see its header).
fn expand_template(template: &str, head_dim: usize, groups: usize, width: usize) -> String {
    let lines: Vec<&str> = template.lines().collect();
    let slot_type = |t: &str| format!("vec{width}<{t}>");
    let mut vars: Vec<(&str, String)> = vec![
        ("D", head_dim.to_string()),
        ("SLOTS", (8 * groups * width).to_string()),
        ("STATE_LEN", (2 + 4 * head_dim.div_ceil(4)).to_string()),
        ("SLOT_TYPE", slot_type("f32")),
        ("SLOT_TYPE_U", slot_type("u32")),
    ];
    let shape = TemplateShape {
        head_dim,
        groups,
        width,
    };
    let mut out = String::with_capacity(template.len() * 8);
    let mut pos = 0;
    shape.expand(&lines, &mut pos, &mut vars, &mut out);
    out
}

struct TemplateShape {
    head_dim: usize,
    groups: usize,
    width: usize,
}

impl TemplateShape {
    /// The bindings of one `//#for` range, each a list of (name, value).
    fn range(&self, spec: &str, vars: &[(&str, String)]) -> Vec<Vec<(&'static str, String)>> {
        let var = |name: &str| -> usize {
            vars.iter()
                .rev()
                .find(|(n, _)| *n == name)
                .and_then(|(_, v)| v.parse().ok())
                .expect("template loops nest as the header says")
        };
        match spec {
            "c in channels" => (0..self.head_dim)
                .map(|c| vec![("c", c.to_string())])
                .collect(),
            "k in chunks" => (0..self.head_dim.div_ceil(8))
                .map(|k| vec![("k", k.to_string()), ("c0", (8 * k).to_string())])
                .collect(),
            "c in chunk" => {
                let c0 = var("c0");
                (c0..(c0 + 8).min(self.head_dim))
                    .map(|c| vec![("c", c.to_string()), ("i", (c - c0).to_string())])
                    .collect()
            }
            "g in groups" => (0..self.groups)
                .map(|g| vec![("g", g.to_string())])
                .collect(),
            "r in slots" => {
                let g = var("g");
                (0..self.width)
                    .map(|r| {
                        vec![
                            ("r", r.to_string()),
                            ("slot", (g * self.width + r).to_string()),
                        ]
                    })
                    .collect()
            }
            other => panic!("unknown range `{other}` in the attention template"),
        }
    }

    /// Emits lines from `pos` up to the matching `//#end` (or the end).
    fn expand(
        &self,
        lines: &[&str],
        pos: &mut usize,
        vars: &mut Vec<(&str, String)>,
        out: &mut String,
    ) {
        while *pos < lines.len() {
            let line = lines[*pos];
            let directive = line.trim();
            *pos += 1;
            if directive == "//#end" {
                return;
            }
            if let Some(spec) = directive.strip_prefix("//#for ") {
                let body = *pos;
                let bindings = self.range(spec, vars);
                let mut sink = String::new();
                if bindings.is_empty() {
                    self.expand(lines, pos, vars, &mut sink);
                }
                for binding in bindings {
                    *pos = body;
                    let depth = vars.len();
                    vars.extend(binding);
                    self.expand(lines, pos, vars, out);
                    vars.truncate(depth);
                }
                continue;
            }
            let mut text = line.to_string();
            for (name, value) in vars.iter().rev() {
                text = text.replace(&format!("{{{name}}}"), value);
            }
            out.push_str(&text);
            out.push('\n');
        }
    }
}

/// Scaled dot-product attention over `heads` heads. q [B, Lq, H*D], k and v
/// [B, Lk, H*D] (the layout linear projections produce: head h uses channels
/// h*D..(h+1)*D), out [B, Lq, H*D]. Causal mask: query i sees keys j <= i
/// (CLIP text encoder; Lq == Lk).
pub fn attention(
    gpu: &Gpu,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    opts: &AttentionOptions,
) -> Result<Tensor> {
    let op = "attention";
    let dtype = check_inputs(q, k, v, heads)?;
    let (batch, lq, channels) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let lk = k.shape()[1];
    let head_dim = channels / heads;
    if head_dim > MAX_HEAD_DIM {
        return attention_unfused(gpu, q, k, v, heads, opts);
    }
    let out = Tensor::empty(gpu, q.shape(), dtype)?;
    if out.numel() == 0 {
        return Ok(out);
    }
    let max_grid = gpu.limits().max_compute_workgroups_per_dimension as usize;
    if heads > max_grid {
        return Err(EngineError::Argument {
            op,
            message: format!(
                "{heads} heads exceed the {max_grid} workgroups of one dispatch dimension"
            ),
        });
    }

    // The tensor-core kernel only when asked for or tuned: untuned, it is
    // not known to beat the portable kernel on every shape
    // (docs/PERFORMANCE.md). `coop_attention` (MOTIF_COOP_ATTENTION=1): by
    // default too, to measure it. Its variants are separate shaders, so the
    // tuned one is built before routing decides whether it runs.
    let class = route::attention_class(dtype, head_dim, lq, lk, opts.causal);
    let tuned = route::tuned_coop_constants(gpu, op, &class);
    let coop_choice = coop_choice(gpu, dtype, head_dim, &class, tuned)?;
    let request = route::Request {
        op,
        class,
        dtype,
        asked: opts.kernel.map(|k| match k {
            AttentionKernel::Tiled => KernelName::Tiled,
            AttentionKernel::Subgroup => KernelName::Subgroup,
            AttentionKernel::Coop => KernelName::Coop,
        }),
        coop: coop_choice.as_ref().map(|(k, _)| k.clone()),
        coop_missing: Some(format!(
            "a variant of f16 x f16 -> f32 cooperative matrices, subgroup shuffles and \
             workgroup memory within the adapter's at head dim {head_dim}"
        )),
        coop_by_default: gpu.options().coop_attention,
    };
    let (coop, portable) = match route::route(gpu, request)? {
        Route::Coop(k) => (coop_choice.map(|(_, variant)| (k, variant)), None),
        Route::Portable(Some(KernelName::Tiled)) => (None, Some(AttentionKernel::Tiled)),
        Route::Portable(Some(KernelName::Subgroup)) => (None, Some(AttentionKernel::Subgroup)),
        Route::Portable(_) => (None, None),
    };
    // The portable kernels' launch; the tensor-core kernel takes every key
    // in one pass.
    let launch = if coop.is_some() {
        None
    } else {
        // A tuned kernel that does not run here (another dtype's choice
        // cannot be, but a class spans both): the adapter's default.
        let tuned =
            portable.filter(|k| opts.kernel.is_some() || available_kernels(gpu, dtype).contains(k));
        let variant = match tuned.or_else(|| choose_kernel(gpu, dtype)) {
            Some(v) if available_kernels(gpu, dtype).contains(&v) => v,
            other => {
                return Err(EngineError::Argument {
                    op,
                    message: format!("no attention kernel {other:?} runs on this adapter"),
                })
            }
        };
        Some(launch(variant, dtype, head_dim, lq))
    };
    let mut keys_per_pass = match launch {
        Some(_) => opts.max_keys_per_pass.unwrap_or(lk).max(1),
        None => lk,
    };
    // llvmpipe's loop limit (see CPU_LOOP_BUDGET): passes stay below it.
    if let Some(launch) = launch.as_ref().filter(|_| gpu.adapter().is_cpu) {
        let (per_key, fixed) = launch.loop_cost;
        let budget = ((CPU_LOOP_BUDGET - fixed) as f64 / per_key) as usize;
        keys_per_pass = keys_per_pass.min(budget / TILE_KEYS * TILE_KEYS);
    }
    let passes = lk.div_ceil(keys_per_pass);
    let state_per_item = heads * lq * (2 + 4 * head_dim.div_ceil(4));

    let max_elems = Tensor::max_window_elems(gpu, dtype);
    let mut max_items = (max_elems / (lq * channels)).min(max_elems / (lk * channels));
    if passes > 1 {
        max_items = max_items.min(Tensor::max_window_elems(gpu, DType::F32) / state_per_item);
    }
    if max_items == 0 {
        return Err(EngineError::BindingTooLarge {
            op,
            bytes: (lq.max(lk) * channels) as u64 * dtype.size_bytes(),
            limit: gpu.max_binding_bytes(),
        });
    }
    let windows = windows(
        op,
        batch,
        1,
        max_items.min(max_grid),
        gpu.max_binding_bytes(),
    )?;
    // One pass needs no state; the binding still wants a buffer.
    let state_len = if passes > 1 {
        windows.iter().map(|w| w.1).max().unwrap_or(1) * state_per_item
    } else {
        1
    };
    let state = Tensor::empty(gpu, &[state_len], DType::F32)?;

    let scale = opts.scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
    for (b0, items) in windows {
        let (qb, q_off) = q.window(gpu, b0 * lq * channels, items * lq * channels);
        let (kb, k_off) = k.window(gpu, b0 * lk * channels, items * lk * channels);
        let (vb, v_off) = v.window(gpu, b0 * lk * channels, items * lk * channels);
        let (ob, out_off) = out.window(gpu, b0 * lq * channels, items * lq * channels);
        for pass in 0..passes {
            let key_start = pass * keys_per_pass;
            let p = Params {
                lq: lq as u32,
                lk: lk as u32,
                stride: channels as u32,
                causal: u32::from(opts.causal),
                q_off,
                k_off,
                v_off,
                out_off,
                scale_log2: scale * std::f32::consts::LOG2_E,
                key_start: key_start as u32,
                key_end: (key_start + keys_per_pass).min(lk) as u32,
                heads: heads as u32,
                _pad: [0; 4],
            };
            let Some(launch) = &launch else {
                let (kernel, variant) = coop.as_ref().expect("no launch only for the tensor cores");
                attention_coop::dispatch_coop(
                    gpu,
                    kernel,
                    *variant,
                    attention_coop::Dispatch {
                        params: params_bytes(&p),
                        bindings: [(1, qb), (2, kb), (3, vb), (4, ob)],
                        lq,
                        heads,
                        items,
                    },
                )?;
                continue;
            };
            gpu.dispatch(
                &launch.kernel(pass == 0, pass + 1 == passes),
                params_bytes(&p),
                &[(1, qb), (2, kb), (3, vb), (4, ob), (5, state.binding())],
                [
                    lq.div_ceil(launch.queries) as u32,
                    heads as u32,
                    items as u32,
                ],
            )?;
        }
    }
    Ok(out)
}

/// The shape and dtype checks of every attention kernel: q [B, Lq, H*D],
/// k and v [B, Lk >= 1, H*D], one dtype; returns it.
fn check_inputs(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<DType> {
    let op = "attention";
    check_rank(op, "q [B, Lq, H*D]", q, 3)?;
    check_rank(op, "k [B, Lk, H*D]", k, 3)?;
    check_rank(op, "v [B, Lk, H*D]", v, 3)?;
    let dtype = check_dtypes(op, &[q, k, v])?;
    let (batch, channels) = (q.shape()[0], q.shape()[2]);
    let lk = k.shape()[1];
    if k.shape()[0] != batch || k.shape()[2] != channels || lk == 0 {
        return Err(EngineError::Shape {
            op,
            expected: format!(
                "k [{batch}, Lk >= 1, {channels}] for q {}",
                fmt_shape(q.shape())
            ),
            found: fmt_shape(k.shape()),
        });
    }
    if v.shape() != k.shape() {
        return Err(EngineError::Shape {
            op,
            expected: format!("v of k's shape {}", fmt_shape(k.shape())),
            found: fmt_shape(v.shape()),
        });
    }
    if heads == 0 || !channels.is_multiple_of(heads) {
        return Err(EngineError::Shape {
            op,
            expected: format!("channels divisible by {heads} heads"),
            found: fmt_shape(q.shape()),
        });
    }
    Ok(dtype)
}

/// One tensor-core variant, or its portable twin, of the flash attention
/// (ops/attention_coop.rs), asked for by variant: for the tests and checks
/// of each variant. The tensor-core flavour is refused where the adapter
/// does not run that variant, the twin where it does not fit the adapter
/// (workgroup memory, subgroups, f16, a CPU adapter's loop limit); neither
/// is ever swapped for another kernel. Same inputs as [`attention`], head
/// dims up to 160.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn attention_flash(
    gpu: &Gpu,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    opts: &AttentionOptions,
    variant: FlashVariant,
    flavour: attention_coop::Flavour,
) -> Result<Tensor> {
    let op = "attention";
    let dtype = check_inputs(q, k, v, heads)?;
    let (batch, lq, channels) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let lk = k.shape()[1];
    let head_dim = channels / heads;
    let coop = match flavour {
        attention_coop::Flavour::Coop => {
            if !attention_coop::coop_variants(gpu, dtype, head_dim).contains(&variant) {
                return Err(EngineError::KernelUnavailable {
                    op,
                    kernel: "cooperative-matrix",
                    needs: format!(
                        "variant {} at head dim {head_dim}: f16 operands, {}x{} f16 x f16 -> f32 \
                         cooperative matrices, subgroup shuffles, {} bytes of workgroup memory",
                        variant.describe(),
                        variant.fragment,
                        variant.fragment,
                        variant.workgroup_bytes(head_dim, attention_coop::Flavour::Coop)
                    ),
                    adapter: gpu.adapter().name.clone(),
                    found: format!(
                        "{dtype} operands, cooperative matrices {:?}, {} bytes of workgroup memory",
                        gpu.coop_matrix().map(|c| &c.reported),
                        gpu.limits().max_compute_workgroup_storage_size
                    ),
                });
            }
            let subgroup = gpu.coop_matrix().map_or(0, |c| c.subgroup_size as usize);
            Some(attention_coop::coop_kernel(variant, head_dim, subgroup))
        }
        attention_coop::Flavour::Twin => {
            attention_coop::check_twin(gpu, dtype, variant, head_dim, lk)?;
            None
        }
    };
    let out = Tensor::empty(gpu, q.shape(), dtype)?;
    if out.numel() == 0 {
        return Ok(out);
    }
    let max_grid = gpu.limits().max_compute_workgroups_per_dimension as usize;
    let max_elems = Tensor::max_window_elems(gpu, dtype);
    let max_items = (max_elems / (lq * channels)).min(max_elems / (lk * channels));
    if max_items == 0 || heads > max_grid {
        return Err(EngineError::BindingTooLarge {
            op,
            bytes: (lq.max(lk) * channels) as u64 * dtype.size_bytes(),
            limit: gpu.max_binding_bytes(),
        });
    }
    let scale = opts.scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
    for (b0, items) in windows(
        op,
        batch,
        1,
        max_items.min(max_grid),
        gpu.max_binding_bytes(),
    )? {
        let (qb, q_off) = q.window(gpu, b0 * lq * channels, items * lq * channels);
        let (kb, k_off) = k.window(gpu, b0 * lk * channels, items * lk * channels);
        let (vb, v_off) = v.window(gpu, b0 * lk * channels, items * lk * channels);
        let (ob, out_off) = out.window(gpu, b0 * lq * channels, items * lq * channels);
        let p = Params {
            lq: lq as u32,
            lk: lk as u32,
            stride: channels as u32,
            causal: u32::from(opts.causal),
            q_off,
            k_off,
            v_off,
            out_off,
            scale_log2: scale * std::f32::consts::LOG2_E,
            key_start: 0,
            key_end: lk as u32,
            heads: heads as u32,
            _pad: [0; 4],
        };
        let d = attention_coop::Dispatch {
            params: params_bytes(&p),
            bindings: [(1, qb), (2, kb), (3, vb), (4, ob)],
            lq,
            heads,
            items,
        };
        match &coop {
            Some(kernel) => attention_coop::dispatch_coop(gpu, kernel, variant, d)?,
            None => attention_coop::dispatch_twin(gpu, variant, head_dim, d)?,
        }
    }
    Ok(out)
}

/// Attention for head dims beyond the fused kernels' ([`MAX_HEAD_DIM`]):
/// the SD VAE's mid-block attends over 512 channels in one head. The scores
/// are materialised (product, softmax, product), a block of queries at a
/// time so that they stay within one binding and about 256 MiB.
fn attention_unfused(
    gpu: &Gpu,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    opts: &AttentionOptions,
) -> Result<Tensor> {
    use super::layout::{concat, narrow, permute};
    use super::matmul::{matmul, MatmulOptions};
    let op = "attention";
    let dtype = q.dtype();
    let (batch, lq, channels) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let lk = k.shape()[1];
    let d = channels / heads;
    if opts.causal {
        return Err(EngineError::Argument {
            op,
            message: format!(
                "causal attention takes head dims up to {MAX_HEAD_DIM}, found {d} (q {})",
                fmt_shape(q.shape())
            ),
        });
    }
    let bh = batch * heads;
    // [B, L, H*D] → [B*H, L, D]
    let split = |x: &Tensor, l: usize| -> Result<Tensor> {
        if heads == 1 {
            x.reshape(&[batch, l, d])
        } else {
            permute(gpu, &x.reshape(&[batch, l, heads, d])?, &[0, 2, 1, 3])?.reshape(&[bh, l, d])
        }
    };
    let (qh, kh, vh) = (split(q, lq)?, split(k, lk)?, split(v, lk)?);
    let budget =
        Tensor::max_window_elems(gpu, dtype).min((256 << 20) / dtype.size_bytes() as usize);
    let rows = (budget / (bh * lk))
        .min(opts.max_query_rows.unwrap_or(usize::MAX))
        .clamp(1, lq);
    let scale = opts.scale.unwrap_or(1.0 / (d as f32).sqrt());
    let mut parts = Vec::with_capacity(lq.div_ceil(rows));
    for q0 in (0..lq).step_by(rows) {
        let n = rows.min(lq - q0);
        let qc = if n == lq {
            qh.clone()
        } else {
            narrow(gpu, &qh, 1, q0, n)?
        };
        let scores = matmul(
            gpu,
            &qc,
            &kh,
            &MatmulOptions {
                transpose_b: true,
                alpha: scale,
                ..Default::default()
            },
        )?;
        let p = super::softmax::softmax(gpu, &scores)?;
        parts.push(matmul(gpu, &p, &vh, &MatmulOptions::default())?);
    }
    let o = match parts.len() {
        1 => parts.pop().expect("one part"),
        _ => concat(gpu, &parts.iter().collect::<Vec<_>>(), 1)?,
    };
    if heads == 1 {
        o.reshape(&[batch, lq, channels])
    } else {
        permute(gpu, &o.reshape(&[batch, heads, lq, d])?, &[0, 2, 1, 3])?
            .reshape(&[batch, lq, channels])
    }
}

/// CPU reference of [`attention`] in f64: q [batch, lq, C], k and v
/// [batch, lk, C], C = heads * head_dim. Materialises each query's scores
/// (fine on the CPU, and the plainest statement of the maths).
#[allow(clippy::too_many_arguments)]
pub fn attention_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    batch: usize,
    lq: usize,
    lk: usize,
    heads: usize,
    opts: &AttentionOptions,
) -> Vec<f32> {
    let channels = q.len() / (batch * lq).max(1);
    let d = channels / heads;
    let scale = opts.scale.map_or(1.0 / (d as f64).sqrt(), |s| s as f64);
    let mut out = vec![0f32; q.len()];
    let mut scores = vec![0f64; lk];
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..lq {
                let qi = &q[(b * lq + i) * channels + h * d..][..d];
                let visible = if opts.causal { lk.min(i + 1) } else { lk };
                for (j, s) in scores[..visible].iter_mut().enumerate() {
                    let kj = &k[(b * lk + j) * channels + h * d..][..d];
                    *s = scale
                        * qi.iter()
                            .zip(kj)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>();
                }
                let max = scores[..visible]
                    .iter()
                    .fold(f64::NEG_INFINITY, |m, &s| m.max(s));
                let mut sum = 0.0;
                for s in &mut scores[..visible] {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let o = &mut out[(b * lq + i) * channels + h * d..][..d];
                for (c, o) in o.iter_mut().enumerate() {
                    let acc: f64 = (0..visible)
                        .map(|j| scores[j] * v[(b * lk + j) * channels + h * d + c] as f64)
                        .sum();
                    *o = (acc / sum) as f32;
                }
            }
        }
    }
    out
}
