//! Flash attention on tensor cores, and its portable twin: the variants of
//! `shaders/attention_coop.wgsl` (a template; its header says what the
//! kernel does), their workgroup memory, and their dispatch. ops/attention.rs
//! validates the inputs and asks ops/route.rs whether the tensor cores run;
//! this file builds the variant routing chose (the tuning file's, else the
//! default for the adapter) and dispatches it.
//!
//! A variant is a fragment shape (8x8 or 16x16, as the adapter offers), a
//! number of subgroups per workgroup (F query rows each: the query block is
//! their product) and a key tile. Every variant that fits the adapter's
//! workgroup memory is one the tuner may try (`motif bench --tune`); one
//! that does not fit is refused, never shrunk.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, OnceLock};

use super::coop::{CoopKernel, CoopNeeds};
use super::norm::CPU_LOOP_BUDGET;
use crate::error::{EngineError, Result};
use crate::gpu::{Binding, Gpu};
use crate::tensor::DType;

/// The template of every variant, both flavours.
#[doc(hidden)]
pub const TEMPLATE: &str = include_str!("../../../shaders/attention_coop.wgsl");
/// The entry point of every variant.
pub const ENTRY: &str = "attention_flash";
/// The head dims the kernel holds: up to SD 1.5's deepest 160 (40, 64, 80,
/// 128 and 160 are the models'; others are padded the same way).
pub const MAX_HEAD_DIM: usize = 160;
/// NVIDIA's Vulkan driver gives a workgroup 48 KiB of shared memory: the
/// bound the variants are generated within where no adapter says otherwise
/// (the validation tests).
pub const NVIDIA_WORKGROUP_BYTES: u32 = 48 * 1024;

/// The fragment shapes, subgroup counts and key tiles the template is
/// generated for.
pub const FRAGMENTS: [usize; 2] = [16, 8];
pub const SUBGROUPS: [usize; 3] = [4, 2, 8];
pub const KEY_TILES: [usize; 3] = [32, 16, 64];

/// Which of the template's two kernels a variant is built as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flavour {
    /// Both products on cooperative matrices.
    Coop,
    /// The same tiles, staging and online softmax, with scalar products:
    /// runs wherever f16 and subgroups do, to check the algorithm.
    Twin,
}

/// One variant of the template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlashVariant {
    /// Rows, columns and depth of a fragment (8 or 16).
    pub fragment: usize,
    /// Subgroups of a workgroup, each owning `fragment` query rows.
    pub subgroups: usize,
    /// Keys staged per tile.
    pub key_tile: usize,
}

/// The tuning file's names of a variant's parameters (gpu/tuning.rs).
const TUNED_FRAGMENT: &str = "FRAGMENT";
const TUNED_SUBGROUPS: &str = "SUBGROUPS";
const TUNED_KEY_TILE: &str = "KEY_TILE";

impl FlashVariant {
    /// Queries of one workgroup.
    pub fn query_block(&self) -> usize {
        self.subgroups * self.fragment
    }

    /// The head dim in whole fragments.
    pub fn padded_head_dim(&self, head_dim: usize) -> usize {
        head_dim.div_ceil(self.fragment) * self.fragment
    }

    /// Invocations of one workgroup, with subgroups of `subgroup` lanes.
    pub fn invocations(&self, subgroup: usize) -> usize {
        self.subgroups * subgroup
    }

    /// Bytes of workgroup memory one workgroup uses (as the template
    /// declares it, each array rounded up to 16 bytes).
    pub fn workgroup_bytes(&self, head_dim: usize, flavour: Flavour) -> u32 {
        let s = self.sizes(head_dim);
        let round = |b: usize| b.div_ceil(16) * 16;
        let zeros = match flavour {
            Flavour::Coop => round(4 * self.fragment * self.fragment),
            Flavour::Twin => 0,
        };
        (round(2 * s.q_tile)
            + round(2 * s.kv_tile)
            + round(4 * s.s_tile)
            + round(2 * s.p_tile)
            + 16
            + zeros) as u32
    }

    fn sizes(&self, head_dim: usize) -> Sizes {
        let dp = self.padded_head_dim(head_dim);
        let ld = dp + 8;
        let f = self.fragment;
        Sizes {
            dp,
            q_tile: self.query_block() * ld,
            kv_tile: 2 * self.key_tile * ld,
            s_tile: self.subgroups * f * (self.key_tile + 4),
            p_tile: self.subgroups * f * (self.key_tile + 8),
        }
    }

    /// The variant as the tuning file names it.
    pub fn constants(&self) -> BTreeMap<String, f64> {
        BTreeMap::from([
            (TUNED_FRAGMENT.to_string(), self.fragment as f64),
            (TUNED_SUBGROUPS.to_string(), self.subgroups as f64),
            (TUNED_KEY_TILE.to_string(), self.key_tile as f64),
        ])
    }

    /// The variant a tuning file names; None where it names none of the
    /// template's.
    pub fn from_constants(constants: &BTreeMap<String, f64>) -> Option<FlashVariant> {
        let get = |name: &str, allowed: &[usize]| {
            let v = *constants.get(name)?;
            allowed.iter().copied().find(|&a| a as f64 == v)
        };
        let known = [TUNED_FRAGMENT, TUNED_SUBGROUPS, TUNED_KEY_TILE];
        if constants.keys().any(|k| !known.contains(&k.as_str())) {
            return None;
        }
        Some(FlashVariant {
            fragment: get(TUNED_FRAGMENT, &FRAGMENTS)?,
            subgroups: get(TUNED_SUBGROUPS, &SUBGROUPS)?,
            key_tile: get(TUNED_KEY_TILE, &KEY_TILES)?,
        })
    }

    /// `f16 sg4 bk32`, for kernel names and reports.
    pub fn describe(&self) -> String {
        format!(
            "f{} sg{} bk{}",
            self.fragment, self.subgroups, self.key_tile
        )
    }

    /// Why this variant cannot be built for `head_dim` on subgroups of
    /// `subgroup` lanes within `max_bytes` of workgroup memory; None if it
    /// can.
    pub fn unfit(
        &self,
        head_dim: usize,
        subgroup: usize,
        max_bytes: u32,
        flavour: Flavour,
    ) -> Option<String> {
        let f = self.fragment;
        if head_dim == 0 || head_dim > MAX_HEAD_DIM {
            return Some(format!("head dims 1..={MAX_HEAD_DIM}, found {head_dim}"));
        }
        if !FRAGMENTS.contains(&f)
            || !SUBGROUPS.contains(&self.subgroups)
            || !KEY_TILES.contains(&self.key_tile)
        {
            return Some(format!(
                "fragments {FRAGMENTS:?}, subgroups {SUBGROUPS:?}, key tiles {KEY_TILES:?}"
            ));
        }
        // LS / F lanes share a query row in the softmax.
        if subgroup < f || !subgroup.is_multiple_of(f) || !(subgroup / f).is_power_of_two() {
            return Some(format!(
                "subgroups of a power-of-two multiple of the {f}-row fragment, found {subgroup} lanes"
            ));
        }
        let bytes = self.workgroup_bytes(head_dim, flavour);
        (bytes > max_bytes).then(|| {
            format!(
                "{bytes} bytes of workgroup memory for {} at head dim {head_dim}, above the \
                 adapter's {max_bytes}",
                self.describe()
            )
        })
    }
}

struct Sizes {
    dp: usize,
    q_tile: usize,
    kv_tile: usize,
    s_tile: usize,
    p_tile: usize,
}

/// Every variant of the template for `head_dim` on subgroups of `subgroup`
/// lanes, with `fragments` (the adapter's), within `max_bytes` of workgroup
/// memory: the tuner's space, the default first (16-wide fragments, 4
/// subgroups, 32-key tiles, then the nearest that fit).
pub fn variants(
    head_dim: usize,
    subgroup: usize,
    fragments: &[usize],
    max_bytes: u32,
    flavour: Flavour,
) -> Vec<FlashVariant> {
    let mut out = Vec::new();
    for fragment in FRAGMENTS.into_iter().filter(|f| fragments.contains(f)) {
        for subgroups in SUBGROUPS {
            for key_tile in KEY_TILES {
                let v = FlashVariant {
                    fragment,
                    subgroups,
                    key_tile,
                };
                if v.unfit(head_dim, subgroup, max_bytes, flavour).is_none() {
                    out.push(v);
                }
            }
        }
    }
    out
}

/// The template expanded for one variant: its family name (the pipeline
/// cache keeps one module per family) and source, each built once and kept
/// for the process's life. The variant must fit (`FlashVariant::unfit`).
#[doc(hidden)]
pub fn expand(
    variant: FlashVariant,
    head_dim: usize,
    subgroup: usize,
    flavour: Flavour,
) -> (&'static str, &'static str) {
    type Built = HashMap<(FlashVariant, usize, usize, Flavour), (&'static str, &'static str)>;
    static BUILT: OnceLock<Mutex<Built>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .expect("attention_coop kernel cache lock poisoned");
    *built
        .entry((variant, head_dim, subgroup, flavour))
        .or_insert_with(|| {
            let family = format!(
                "attention_{}_d{head_dim}_ls{subgroup}_f{}_sg{}_bk{}",
                match flavour {
                    Flavour::Coop => "coop",
                    Flavour::Twin => "twin",
                },
                variant.fragment,
                variant.subgroups,
                variant.key_tile
            );
            let source = expand_template(TEMPLATE, variant, head_dim, subgroup, flavour);
            (
                Box::leak(family.into_boxed_str()),
                Box::leak(source.into_boxed_str()),
            )
        })
}

type Bindings = Vec<(&'static str, String)>;

fn expand_template(
    template: &str,
    variant: FlashVariant,
    head_dim: usize,
    subgroup: usize,
    flavour: Flavour,
) -> String {
    let s = variant.sizes(head_dim);
    let f = variant.fragment;
    let lpr = subgroup / f;
    let range = |n: usize, step: usize, names: (&'static str, &'static str)| -> Vec<Bindings> {
        (0..n)
            .map(|i| vec![(names.0, i.to_string()), (names.1, (i * step).to_string())])
            .collect()
    };
    let plain = |n: usize, name: &'static str| -> Vec<Bindings> {
        (0..n).map(|i| vec![(name, i.to_string())]).collect()
    };
    let ranges: Vec<(&str, Vec<Bindings>)> = vec![
        ("key_frags", range(variant.key_tile / f, f, ("n", "n0"))),
        ("dim_frags", range(s.dp / f, f, ("j", "j0"))),
        ("frag_cols", plain(f / lpr, "i")),
        ("lane_keys", plain(variant.key_tile / lpr, "c")),
        ("lane_dims", plain(s.dp / lpr, "c")),
        (
            "row_lanes",
            std::iter::successors(Some(1usize), |m| Some(m * 2))
                .take_while(|&m| m < lpr)
                .map(|m| vec![("mask", m.to_string())])
                .collect(),
        ),
    ];
    let values: Bindings = vec![
        ("D", head_dim.to_string()),
        ("DP", s.dp.to_string()),
        ("F", f.to_string()),
        ("FF", (f * f).to_string()),
        ("LS", subgroup.to_string()),
        ("SG", variant.subgroups.to_string()),
        ("BQ", variant.query_block().to_string()),
        ("BK", variant.key_tile.to_string()),
        ("LPR", lpr.to_string()),
        ("INVOCATIONS", variant.invocations(subgroup).to_string()),
        ("Q_TILE", s.q_tile.to_string()),
        ("KV_TILE", s.kv_tile.to_string()),
        ("S_TILE", s.s_tile.to_string()),
        ("P_TILE", s.p_tile.to_string()),
    ];
    let flavour = match flavour {
        Flavour::Coop => "coop",
        Flavour::Twin => "twin",
    };
    let lines: Vec<&str> = template.lines().collect();
    let mut out = String::with_capacity(template.len() * 4);
    let mut vars = values;
    let mut pos = 0;
    Expander {
        lines: &lines,
        ranges: &ranges,
        flavour,
    }
    .block(&mut pos, &mut vars, Some(&mut out));
    out
}

/// The template's directives (see the shader's header).
struct Expander<'a> {
    lines: &'a [&'a str],
    ranges: &'a [(&'a str, Vec<Bindings>)],
    flavour: &'a str,
}

impl Expander<'_> {
    /// Emits (into `out`, or nowhere) the lines from `pos` up to the
    /// matching `//#end` or the end.
    fn block(&self, pos: &mut usize, vars: &mut Bindings, mut out: Option<&mut String>) {
        while *pos < self.lines.len() {
            let line = self.lines[*pos];
            let directive = line.trim();
            *pos += 1;
            if directive == "//#end" {
                return;
            }
            if let Some(flag) = directive.strip_prefix("//#if ") {
                let keep = flag.trim() == self.flavour;
                match out.as_deref_mut() {
                    Some(o) if keep => self.block(pos, vars, Some(o)),
                    _ => self.block(pos, vars, None),
                }
                continue;
            }
            if let Some(spec) = directive.strip_prefix("//#for ") {
                let name = spec.split(" in ").nth(1).unwrap_or("").trim();
                let bindings = &self
                    .ranges
                    .iter()
                    .find(|(n, _)| *n == name)
                    .unwrap_or_else(|| panic!("unknown range `{name}` in attention_coop.wgsl"))
                    .1;
                let body = *pos;
                // An empty range still has to be skipped to its end.
                self.block(pos, vars, None);
                let end = *pos;
                if let Some(o) = out.as_deref_mut() {
                    for binding in bindings {
                        *pos = body;
                        let depth = vars.len();
                        vars.extend(binding.iter().cloned());
                        self.block(pos, vars, Some(o));
                        vars.truncate(depth);
                    }
                }
                *pos = end;
                continue;
            }
            if let Some(o) = out.as_deref_mut() {
                let mut text = line.to_string();
                for (name, value) in vars.iter().rev() {
                    text = text.replace(&format!("{{{name}}}"), value);
                }
                o.push_str(&text);
                o.push('\n');
            }
        }
    }
}

/// The f16 x f16 -> f32 fragment sizes `gpu`'s tensor-core variants may
/// use: the adapter's, where it also has the subgroup shuffles of the
/// softmax; none elsewhere.
fn coop_fragments(gpu: &Gpu) -> Vec<usize> {
    if !gpu.features().contains(wgpu::Features::SUBGROUP) {
        return Vec::new();
    }
    gpu.coop_matrix()
        .map(|c| c.fragments.iter().map(|&f| f as usize).collect())
        .unwrap_or_default()
}

/// The tensor-core variants `gpu` runs at `head_dim` on `dtype`, the default
/// first; empty where it runs none.
pub fn coop_variants(gpu: &Gpu, dtype: DType, head_dim: usize) -> Vec<FlashVariant> {
    let Some(config) = gpu.coop_matrix() else {
        return Vec::new();
    };
    if dtype != DType::F16 {
        return Vec::new();
    }
    let limits = gpu.limits();
    variants(
        head_dim,
        config.subgroup_size as usize,
        &coop_fragments(gpu),
        limits.max_compute_workgroup_storage_size,
        Flavour::Coop,
    )
    .into_iter()
    .filter(|v| {
        v.invocations(config.subgroup_size as usize)
            <= limits.max_compute_invocations_per_workgroup as usize
    })
    .collect()
}

/// The few variants `motif bench --tune` times per class (each costs the
/// class's full-size shape three times, and the GPU run has minutes): a
/// spread of those that fit — the default, the largest query block, the
/// largest key tile, the 8-wide fragments — then the default's neighbours.
pub fn tuner_variants(gpu: &Gpu, dtype: DType, head_dim: usize) -> Vec<FlashVariant> {
    spread(coop_variants(gpu, dtype, head_dim), 4)
}

fn spread(all: Vec<FlashVariant>, n: usize) -> Vec<FlashVariant> {
    let wide = all.iter().filter(|v| v.fragment == FRAGMENTS[0]);
    let picks = [
        all.first(),
        wide.clone().max_by_key(|v| (v.query_block(), v.key_tile)),
        wide.max_by_key(|v| (v.key_tile, v.query_block())),
        all.iter().find(|v| v.fragment != FRAGMENTS[0]),
    ];
    let mut out: Vec<FlashVariant> = Vec::new();
    for v in picks.into_iter().flatten().chain(all.iter()) {
        if out.len() < n && !out.contains(v) {
            out.push(*v);
        }
    }
    out
}

/// The tensor-core kernel of one variant, as ops/coop.rs and routing take
/// it; the variant must fit (see [`coop_variants`]).
pub(crate) fn coop_kernel(variant: FlashVariant, head_dim: usize, subgroup: usize) -> CoopKernel {
    let (family, source) = expand(variant, head_dim, subgroup, Flavour::Coop);
    CoopKernel {
        op: "attention",
        family,
        label: "attention_coop",
        source,
        entry: ENTRY,
        constants: Vec::new(),
        needs: CoopNeeds {
            invocations: variant.invocations(subgroup) as u32,
            workgroup_bytes: variant.workgroup_bytes(head_dim, Flavour::Coop),
            subgroup: subgroup as u32,
        },
    }
}

/// The twin's lanes per subgroup: the width the tensor-core variants are
/// written for on the GPUs that have them (NVIDIA's 32), whatever the
/// adapter's own subgroups; the row reductions only need a row's LS / F
/// lanes to share a hardware subgroup.
pub const TWIN_SUBGROUP: usize = 32;

/// Loop iterations one invocation of the twin runs for `lk` keys: llvmpipe
/// ends an invocation's loops after 65535 iterations in all (see
/// `CPU_LOOP_BUDGET`), so the twin refuses more there.
fn twin_loop_iterations(variant: FlashVariant, head_dim: usize, lk: usize) -> usize {
    let s = variant.sizes(head_dim);
    let invocations = variant.invocations(TWIN_SUBGROUP);
    let stage = |rows: usize| (rows * s.dp / 4).div_ceil(invocations) * 5;
    let tiles = lk.div_ceil(variant.key_tile);
    stage(variant.query_block()) + tiles * (1 + stage(variant.key_tile) + s.dp + variant.key_tile)
}

/// The keys the twin of `variant` takes at `head_dim` on `gpu`.
pub fn twin_max_keys(gpu: &Gpu, variant: FlashVariant, head_dim: usize) -> usize {
    if !gpu.adapter().is_cpu {
        return usize::MAX;
    }
    let mut lk = variant.key_tile;
    while twin_loop_iterations(variant, head_dim, lk + variant.key_tile) <= CPU_LOOP_BUDGET {
        lk += variant.key_tile;
    }
    lk
}

/// One dispatch of the attention over `items` batch items, `heads` heads:
/// the kernel and its grid (ops/attention.rs fills `params`).
pub(crate) struct Dispatch<'a> {
    pub params: &'a [u8],
    pub bindings: [(u32, Binding<'a>); 4],
    pub lq: usize,
    pub heads: usize,
    pub items: usize,
}

/// Records one dispatch of `kernel` (a tensor-core variant from
/// [`coop_kernel`]).
pub(crate) fn dispatch_coop(
    gpu: &Gpu,
    kernel: &CoopKernel,
    variant: FlashVariant,
    d: Dispatch<'_>,
) -> Result<()> {
    super::coop::dispatch(
        gpu,
        kernel,
        d.params,
        &d.bindings,
        [
            d.lq.div_ceil(variant.query_block()) as u32,
            d.heads as u32,
            d.items as u32,
        ],
    )
}

/// Checks that the twin of `variant` runs here for `head_dim` and `lk`
/// keys, with the error that names what it needs.
pub(crate) fn check_twin(
    gpu: &Gpu,
    dtype: DType,
    variant: FlashVariant,
    head_dim: usize,
    lk: usize,
) -> Result<()> {
    let op = "attention";
    let limits = gpu.limits();
    let mut why = variant.unfit(
        head_dim,
        TWIN_SUBGROUP,
        limits.max_compute_workgroup_storage_size,
        Flavour::Twin,
    );
    if dtype != DType::F16 || !gpu.has_f16() {
        why = Some(format!(
            "f16 operands on an adapter with f16, found {dtype}"
        ));
    }
    if !gpu.features().contains(wgpu::Features::SUBGROUP)
        || (gpu.adapter_info().subgroup_min_size as usize) < TWIN_SUBGROUP / variant.fragment
    {
        why = Some(format!(
            "subgroups of at least {} lanes",
            TWIN_SUBGROUP / variant.fragment
        ));
    }
    let max_keys = twin_max_keys(gpu, variant, head_dim);
    if lk > max_keys {
        why = Some(format!(
            "at most {max_keys} keys at head dim {head_dim} on this CPU adapter (its loop \
             limit), found {lk}"
        ));
    }
    match why {
        None => Ok(()),
        Some(message) => Err(EngineError::Argument {
            op,
            message: format!("the twin of {}: {message}", variant.describe()),
        }),
    }
}

/// Records one dispatch of the twin of `variant` (checked by
/// [`check_twin`]).
pub(crate) fn dispatch_twin(
    gpu: &Gpu,
    variant: FlashVariant,
    head_dim: usize,
    d: Dispatch<'_>,
) -> Result<()> {
    let op = "attention";
    if !gpu.check_dispatch(
        op,
        &d.bindings,
        [
            d.lq.div_ceil(variant.query_block()) as u32,
            d.heads as u32,
            d.items as u32,
        ],
    )? {
        return Ok(());
    }
    let (family, source) = expand(variant, head_dim, TWIN_SUBGROUP, Flavour::Twin);
    let pipeline = gpu.compile(family, source, ENTRY, None, &[])?;
    gpu.record_dispatch(
        &pipeline,
        op,
        "attention_twin",
        d.params,
        &d.bindings,
        [
            d.lq.div_ceil(variant.query_block()) as u32,
            d.heads as u32,
            d.items as u32,
        ],
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tuning file names a variant by its constants and routing reads it
    /// back; anything else in the file names no variant.
    #[test]
    fn tuned_constants_name_one_variant() {
        for v in variants(128, 32, &FRAGMENTS, NVIDIA_WORKGROUP_BYTES, Flavour::Coop) {
            assert_eq!(FlashVariant::from_constants(&v.constants()), Some(v));
        }
        let mut c = FlashVariant {
            fragment: 16,
            subgroups: 4,
            key_tile: 32,
        }
        .constants();
        c.insert("KEY_TILE".into(), 48.0);
        assert_eq!(FlashVariant::from_constants(&c), None);
        c.insert("KEY_TILE".into(), 32.0);
        c.insert("FAST_STAGING".into(), 1.0);
        assert_eq!(FlashVariant::from_constants(&c), None);
    }

    /// The tuner's few variants are a spread: at head dim 40 within 48 KiB,
    /// the default, 8 subgroups, 64-key tiles and 8-wide fragments.
    #[test]
    fn tuner_tries_a_spread_of_variants() {
        let all = variants(40, 32, &FRAGMENTS, NVIDIA_WORKGROUP_BYTES, Flavour::Coop);
        let picked = spread(all.clone(), 4);
        assert_eq!(picked.len(), 4);
        assert_eq!(picked[0], all[0]);
        assert!(picked.iter().any(|v| v.subgroups == 8));
        assert!(picked.iter().any(|v| v.key_tile == 64));
        assert!(picked.iter().any(|v| v.fragment == 8));
    }

    /// Each flavour keeps its own lines, and a range repeats its lines once
    /// per value (none for an empty one: 16-lane rows need no shuffle).
    #[test]
    fn template_expands_flavours_and_ranges() {
        let v = FlashVariant {
            fragment: 16,
            subgroups: 2,
            key_tile: 32,
        };
        let coop = expand_template(TEMPLATE, v, 40, 32, Flavour::Coop);
        let twin = expand_template(TEMPLATE, v, 40, 32, Flavour::Twin);
        assert!(coop.contains("enable wgpu_cooperative_matrix;"));
        let code = |s: &str| -> String {
            s.lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect()
        };
        assert!(code(&coop).contains("coopMultiplyAdd"));
        assert!(!code(&twin).contains("coop"));
        for placeholder in ["{F}", "{D}", "{BK}", "{j0}", "{n0}", "{c}", "{mask}", "{i}"] {
            assert!(!coop.contains(placeholder) && !twin.contains(placeholder));
        }
        // 48 / 16 output fragments; 2 lanes per row: one shuffle mask.
        assert_eq!(coop.matches("var o").count(), 3);
        assert_eq!(twin.matches("var o").count(), 24);
        assert_eq!(coop.matches("subgroupShuffleXor").count(), 2);
        let one_lane = expand_template(TEMPLATE, v, 40, 16, Flavour::Coop);
        assert_eq!(one_lane.matches("subgroupShuffleXor").count(), 0);
        assert!(!coop.lines().any(|l| l.trim_start().starts_with("//#")));
    }
}
