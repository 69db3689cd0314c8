//! The tensor-core matmul and implicit-GEMM convolution as a space of
//! variants: the shader template `shaders/matmul_coop.wgsl` filled in per
//! [`CoopTiling`] (workgroup tile, subgroups, fragments per subgroup,
//! fragment shape, load width, single or double-buffered staging) and per
//! product (plain b, transposed b, convolution). Each variant also has a
//! portable twin ([`FragmentMath::Twin`]): the same staging, tiling and
//! epilogue with the fragments computed in plain f32 arithmetic, which runs
//! on any adapter with f16 storage and is how the software driver tests the
//! tiling of every variant. ops/matmul.rs and ops/conv2d.rs dispatch these
//! kernels; the tuner (tune.rs) chooses among [`variant_space`].
//!
//! Uses only the leaf ops/coop.rs: no operator is known here.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Mutex;

use super::coop::{self, CoopKernel, CoopNeeds};
use super::Activation;
use crate::error::{EngineError, Result};
use crate::gpu::tuning::KernelName;
use crate::gpu::Gpu;
use crate::tensor::DType;

const TEMPLATE: &str = include_str!("../../../shaders/matmul_coop.wgsl");

/// What one dispatch computes: a product (with `b` transposed or not) or a
/// convolution's implicit product (ops/conv2d.rs).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CoopProduct {
    Matmul { transpose_b: bool },
    Conv,
}

impl CoopProduct {
    pub const ALL: [CoopProduct; 3] = [
        CoopProduct::Matmul { transpose_b: false },
        CoopProduct::Matmul { transpose_b: true },
        CoopProduct::Conv,
    ];

    fn tag(self) -> &'static str {
        match self {
            CoopProduct::Matmul { transpose_b: false } => "mm",
            CoopProduct::Matmul { transpose_b: true } => "mmbt",
            CoopProduct::Conv => "conv",
        }
    }
}

/// How a variant's fragments are computed.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FragmentMath {
    /// Cooperative matrices (tensor cores).
    Coop,
    /// The portable twin: per-element f32 arithmetic, any adapter.
    Twin,
}

/// One variant of the kernel's tiling. The workgroup tile is
/// `sg_m * frags_m * frag` rows by `sg_n * frags_n * frag` columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CoopTiling {
    /// Fragment rows = columns = depth: 8 or 16, as the adapter offers.
    pub frag: u32,
    /// Subgroups of a workgroup along M and N.
    pub sg_m: u32,
    pub sg_n: u32,
    /// Accumulator fragments of one subgroup along M and N.
    pub frags_m: u32,
    pub frags_n: u32,
    /// Depth of one staging step along K.
    pub tile_k: u32,
    /// Halves per load of a (and of b, except a convolution's gathered b):
    /// 1, 2, 4 or 8 (a 128-bit load). Dispatches whose offsets, strides or
    /// K are not multiples of it run the same tiling with loads of 1.
    pub load: u32,
    /// Staging buffers per operand: 1 (the next step waits in registers
    /// for a second barrier) or 2 (double-buffered, one barrier per step).
    pub stages: u32,
}

/// Names of the tiling's fields in a tuning file's constants.
const FIELDS: [&str; 8] = [
    "FRAG", "SG_M", "SG_N", "FRAGS_M", "FRAGS_N", "TILE_K", "LOAD", "STAGES",
];

impl CoopTiling {
    /// The untuned default: 128 x 128 tiles of 8 subgroups each holding
    /// 2 x 4 fragments of 16 x 16, steps of 32 along K, register-prefetched
    /// single staging, scalar loads — the kernel measured on the H200
    /// before the tuner existed (docs/PERFORMANCE.md), so an untuned
    /// adapter runs what is known to work.
    pub const DEFAULT: CoopTiling = CoopTiling {
        frag: 16,
        sg_m: 4,
        sg_n: 2,
        frags_m: 2,
        frags_n: 4,
        tile_k: 32,
        load: 1,
        stages: 1,
    };

    pub fn tile_m(&self) -> u32 {
        self.sg_m * self.frags_m * self.frag
    }

    pub fn tile_n(&self) -> u32 {
        self.sg_n * self.frags_n * self.frag
    }

    pub fn subgroups(&self) -> u32 {
        self.sg_m * self.sg_n
    }

    /// This tiling with loads of one half (for misaligned dispatches).
    pub fn scalar_loads(&self) -> CoopTiling {
        CoopTiling { load: 1, ..*self }
    }

    /// Halves per load of b (a convolution gathers b one value at a time).
    fn load_b(&self, product: CoopProduct) -> u32 {
        match product {
            CoopProduct::Conv => 1,
            CoopProduct::Matmul { .. } => self.load,
        }
    }

    fn a_len(&self) -> u32 {
        self.stages * self.tile_m() * (self.tile_k + 8)
    }

    fn b_len(&self) -> u32 {
        self.stages * self.tile_k * (self.tile_n() + 8)
    }

    fn c_len(&self) -> u32 {
        self.subgroups() * self.frag * self.frag
    }

    /// Workgroup memory of one workgroup in bytes: the staging buffers of
    /// both operands (f16) and one f32 fragment per subgroup.
    pub fn workgroup_bytes(&self) -> u32 {
        2 * (self.a_len() + self.b_len()) + 4 * self.c_len()
    }

    /// What it needs of the adapter with `subgroup`-wide subgroups.
    pub(crate) fn needs(&self, subgroup: u32) -> CoopNeeds {
        CoopNeeds {
            invocations: self.subgroups() * subgroup,
            workgroup_bytes: self.workgroup_bytes(),
            subgroup,
        }
    }

    /// Why this tiling cannot compute `product` with `subgroup`-wide
    /// subgroups, if it cannot: the shapes the template assumes (whole
    /// chunks per invocation, a convolution's one column per invocation).
    pub fn check(&self, product: CoopProduct, subgroup: u32) -> std::result::Result<(), String> {
        let inv = self.subgroups() * subgroup;
        let (lb, tm, tn, tk) = (
            self.load_b(product),
            self.tile_m(),
            self.tile_n(),
            self.tile_k,
        );
        let fail = |why: String| Err(format!("{}: {why}", self.name()));
        if !matches!(self.frag, 8 | 16) {
            return fail(format!("fragment {} (8 or 16)", self.frag));
        }
        if ![self.sg_m, self.sg_n, self.frags_m, self.frags_n]
            .iter()
            .all(|&v| (1..=8).contains(&v))
        {
            return fail("subgroups and fragments per side must be 1..8".into());
        }
        if !matches!(self.load, 1 | 2 | 4 | 8) || !matches!(self.stages, 1 | 2) {
            return fail("load 1, 2, 4 or 8 and 1 or 2 stages".into());
        }
        if tk == 0 || !tk.is_multiple_of(self.frag) || tk > 64 || !tk.is_multiple_of(self.load) {
            return fail(format!(
                "TILE_K {tk} must be a multiple of the fragment and the load, at most 64"
            ));
        }
        if subgroup == 0 || inv > 1024 {
            return fail(format!("{inv} invocations"));
        }
        if !(tm * tk).is_multiple_of(self.load * inv) {
            return fail(format!(
                "a's {tm}x{tk} tile is not whole chunks of {} per invocation",
                self.load
            ));
        }
        if !(tk * tn).is_multiple_of(lb * inv) {
            return fail(format!(
                "b's {tk}x{tn} tile is not whole chunks of {lb} per invocation"
            ));
        }
        if product == CoopProduct::Conv && !inv.is_multiple_of(tn) {
            return fail(format!(
                "a convolution needs the {tn} columns to divide the {inv} invocations"
            ));
        }
        Ok(())
    }

    /// A short name, in kernel labels and reports.
    pub fn name(&self) -> String {
        format!(
            "{}x{}x{}_sg{}x{}_fr{}x{}_f{}_v{}_s{}",
            self.tile_m(),
            self.tile_n(),
            self.tile_k,
            self.sg_m,
            self.sg_n,
            self.frags_m,
            self.frags_n,
            self.frag,
            self.load,
            self.stages
        )
    }

    /// The tiling as a tuning file's constants.
    pub fn to_constants(&self) -> BTreeMap<String, f64> {
        let v = [
            self.frag,
            self.sg_m,
            self.sg_n,
            self.frags_m,
            self.frags_n,
            self.tile_k,
            self.load,
            self.stages,
        ];
        FIELDS
            .iter()
            .zip(v)
            .map(|(k, v)| (k.to_string(), v as f64))
            .collect()
    }

    /// The tiling a tuning file names; an error saying what is missing or
    /// unknown (the caller names the file).
    pub fn from_constants(c: &BTreeMap<String, f64>) -> std::result::Result<CoopTiling, String> {
        if let Some(k) = c.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(format!(
                "unknown constant `{k}` of the tensor-core matmul (expected {FIELDS:?})"
            ));
        }
        let get = |name: &str| -> std::result::Result<u32, String> {
            match c.get(name) {
                Some(&v) if v >= 0.0 && v.fract() == 0.0 && v <= 1024.0 => Ok(v as u32),
                Some(v) => Err(format!("constant `{name}` = {v}, expected a whole number")),
                None => Err(format!("constant `{name}` missing (expected {FIELDS:?})")),
            }
        };
        Ok(CoopTiling {
            frag: get("FRAG")?,
            sg_m: get("SG_M")?,
            sg_n: get("SG_N")?,
            frags_m: get("FRAGS_M")?,
            frags_n: get("FRAGS_N")?,
            tile_k: get("TILE_K")?,
            load: get("LOAD")?,
            stages: get("STAGES")?,
        })
    }
}

/// The tilings the tuner tries (for 32-wide subgroups; each is checked
/// against the product and the adapter before it runs). All of them fit
/// the 48 KiB of workgroup memory NVIDIA's Vulkan driver gives; an adapter
/// with less refuses the larger ones (`coop::supported`).
pub fn variant_space() -> Vec<CoopTiling> {
    let t = |frag, sg_m, sg_n, frags_m, frags_n, tile_k, load, stages| CoopTiling {
        frag,
        sg_m,
        sg_n,
        frags_m,
        frags_n,
        tile_k,
        load,
        stages,
    };
    vec![
        CoopTiling::DEFAULT,
        // 128 x 128, 8 subgroups of 2 x 4 fragments: 128-bit loads, then
        // double-buffered, then steps of 64 along K.
        t(16, 4, 2, 2, 4, 32, 8, 1),
        t(16, 4, 2, 2, 4, 32, 8, 2),
        t(16, 4, 2, 2, 4, 64, 8, 1),
        // 128 x 128 of 4 subgroups holding 4 x 4 fragments each (llama.cpp's
        // shape on NVIDIA): more work per staged value.
        t(16, 2, 2, 4, 4, 32, 8, 2),
        t(16, 2, 2, 4, 4, 32, 8, 1),
        // Narrower tiles for products with few rows or columns per window.
        t(16, 4, 1, 2, 4, 32, 8, 2),
        t(16, 2, 2, 2, 2, 32, 8, 2),
        // 8 x 8 fragments, where the adapter offers them.
        t(8, 2, 2, 8, 8, 32, 8, 2),
    ]
}

/// Lines between `// #if NAME` and `// #endif` kept only where NAME is set.
fn select_sections(template: &str, flags: &[&str]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut keep = true;
    for line in template.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("// #if ") {
            keep = flags.contains(&name.trim());
            continue;
        }
        if t == "// #endif" {
            keep = true;
            continue;
        }
        if keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// A chunk's WGSL type and zero for `load` halves: f16 vectors, and for
/// 8 halves (one 128-bit load) a pair of them.
fn chunk(load: u32) -> (&'static str, &'static str) {
    match load {
        1 => ("f16", "f16(0.0)"),
        2 => ("vec2<f16>", "vec2<f16>(f16(0.0))"),
        4 => ("vec4<f16>", "vec4<f16>(f16(0.0))"),
        _ => ("Half8", "Half8(vec4<f16>(f16(0.0)), vec4<f16>(f16(0.0)))"),
    }
}

/// `fn NAME(v, s, stride)`: the halves of a chunk into `tile` at s, s +
/// stride, ..., through the dequantisation hook for the weight operand.
fn put_halves(name: &str, tile: &str, load: u32, weight: bool) -> String {
    let (ty, _) = chunk(load);
    let halves: Vec<String> = match load {
        1 => vec!["v".into()],
        2 => ["x", "y"].iter().map(|c| format!("v.{c}")).collect(),
        4 => ["x", "y", "z", "w"]
            .iter()
            .map(|c| format!("v.{c}"))
            .collect(),
        _ => ["lo", "hi"]
            .iter()
            .flat_map(|h| {
                ["x", "y", "z", "w"]
                    .iter()
                    .map(move |c| format!("v.{h}.{c}"))
            })
            .collect(),
    };
    let mut s = format!("fn {name}(v: {ty}, s: u32, stride: u32) {{\n");
    for (i, h) in halves.iter().enumerate() {
        let h = if weight {
            format!("dequant_weight({h})")
        } else {
            h.clone()
        };
        let _ = writeln!(s, "    {tile}[s + {i}u * stride] = {h};");
    }
    s.push_str("}\n");
    s
}

/// The WGSL of one variant. Fails (with the reason) where the tiling
/// cannot compute `product` with `subgroup`-wide subgroups.
pub fn source(
    t: &CoopTiling,
    product: CoopProduct,
    subgroup: u32,
    math: FragmentMath,
) -> std::result::Result<String, String> {
    t.check(product, subgroup)?;
    if math == FragmentMath::Twin && !(t.frag * t.frag).is_multiple_of(subgroup) {
        return Err(format!(
            "{}: the twin spreads a fragment over whole {subgroup}-wide subgroups",
            t.name()
        ));
    }
    let inv = t.subgroups() * subgroup;
    let (la, lb) = (t.load, t.load_b(product));
    let (trans_b, conv) = match product {
        CoopProduct::Matmul { transpose_b } => (transpose_b, false),
        CoopProduct::Conv => (false, true),
    };
    let f = t.frag;
    let (a_ty, a_zero) = chunk(la);
    let (b_ty, b_zero) = chunk(lb);
    let coop = math == FragmentMath::Coop;

    let mut header = String::from("enable f16;\n");
    if coop {
        header.push_str("enable wgpu_cooperative_matrix;\n");
    }
    let consts = [
        ("FRAG", f),
        ("SG_M", t.sg_m),
        ("SG_N", t.sg_n),
        ("FRAGS_M", t.frags_m),
        ("FRAGS_N", t.frags_n),
        ("TILE_M", t.tile_m()),
        ("TILE_N", t.tile_n()),
        ("TILE_K", t.tile_k),
        ("LOAD_A", la),
        ("LOAD_B", lb),
        ("STAGES", t.stages),
        ("SUBGROUP", subgroup),
        ("INVOCATIONS", inv),
        ("TRANS_B", trans_b as u32),
        ("CONV", conv as u32),
        ("A_PER_ROW", t.tile_k / la),
        (
            "B_PER_ROW",
            if trans_b { t.tile_k } else { t.tile_n() } / lb,
        ),
        ("B_ROW_STEP", (inv / t.tile_n()).max(1)),
    ];
    header.push_str("// The variant (ops/matmul_coop.rs).\n");
    for (name, v) in consts {
        let _ = writeln!(header, "const {name}: u32 = {v}u;");
    }
    if la == 8 || lb == 8 {
        header.push_str("// One 128-bit load: eight halves.\nstruct Half8 {\n    lo: vec4<f16>,\n    hi: vec4<f16>,\n}\n");
    }
    let _ = writeln!(header, "alias AChunk = {a_ty};");
    let _ = writeln!(header, "alias BChunk = {b_ty};");
    let _ = writeln!(header, "const A_ZERO: AChunk = {a_zero};");
    let _ = writeln!(header, "const B_ZERO: BChunk = {b_zero};");
    if coop {
        let _ = writeln!(header, "alias Acc = coop_mat{f}x{f}<f32, C>;");
    }

    let staging = format!(
        "{}\n{}",
        put_halves("put_a_halves", "a_tile", la, conv),
        if conv {
            String::new()
        } else {
            put_halves("put_b_halves", "b_tile", lb, trans_b)
        }
    );

    let frags: Vec<(u32, u32)> = (0..t.frags_m)
        .flat_map(|i| (0..t.frags_n).map(move |j| (i, j)))
        .collect();
    let mut acc = String::new();
    if coop {
        // The accumulators start as zeros loaded from workgroup memory:
        // loads and stores are the operations every implementation of the
        // extension has, where a zero constant of a cooperative type is
        // less certain.
        let _ = writeln!(
            acc,
            "    for (var e = lid; e < {}u; e += INVOCATIONS) {{\n        c_frag[e] = 0.0;\n    }}\n    workgroupBarrier();",
            t.c_len()
        );
        let _ = writeln!(
            acc,
            "    var acc_0_0 = coopLoadT<Acc>(&c_frag[sg * FRAG * FRAG], FRAG);"
        );
        for &(i, j) in &frags[1..] {
            let _ = writeln!(acc, "    var acc_{i}_{j} = acc_0_0;");
        }
        acc.push_str("    workgroupBarrier();\n");
    } else {
        for &(i, j) in &frags {
            let _ = writeln!(acc, "    var acc_{i}_{j}: Acc;");
        }
    }

    let a_chunks = t.tile_m() * t.tile_k / (la * inv);
    let b_chunks = t.tile_k * t.tile_n() / (lb * inv);
    let mut regs = String::new();
    for r in 0..a_chunks {
        let _ = writeln!(regs, "    var ra{r}: AChunk;");
    }
    for r in 0..b_chunks {
        let _ = writeln!(regs, "    var rb{r}: BChunk;");
    }
    let fetch = |k: &str, indent: &str| {
        let mut s = String::new();
        for r in 0..a_chunks {
            let _ = writeln!(s, "{indent}ra{r} = fetch_a(z, i0, {k}, lid, {r}u);");
        }
        if conv {
            let _ = writeln!(s, "{indent}var tap = decode_tap({k} + lid / TILE_N);");
            for r in 0..b_chunks {
                let _ = writeln!(
                    s,
                    "{indent}rb{r} = next_tap(&tap, z, oy, ox, {k} + lid / TILE_N + {r}u * B_ROW_STEP);"
                );
            }
        } else {
            for r in 0..b_chunks {
                let _ = writeln!(s, "{indent}rb{r} = fetch_b(z, j0, {k}, lid, {r}u);");
            }
        }
        s
    };
    let put = |buf: &str, indent: &str| {
        let mut s = String::new();
        for r in 0..a_chunks {
            let _ = writeln!(s, "{indent}put_a(ra{r}, {buf}, lid, {r}u);");
        }
        for r in 0..b_chunks {
            let _ = writeln!(s, "{indent}put_b(rb{r}, {buf}, lid, {r}u);");
        }
        s
    };

    let mut multiply = String::new();
    for ks in 0..t.tile_k / f {
        multiply.push_str("        {\n");
        let a_at = |i: u32| format!("cur * A_STAGE + (sm + {i}u * FRAG) * A_LD + {}u", ks * f);
        let b_at = |j: u32| format!("cur * B_STAGE + {}u * B_LD + sn + {j}u * FRAG", ks * f);
        if coop {
            for i in 0..t.frags_m {
                let _ = writeln!(
                    multiply,
                    "            let fa{i} = coopLoadT<coop_mat{f}x{f}<f16, A>>(&a_tile[{}], A_LD);",
                    a_at(i)
                );
            }
            for j in 0..t.frags_n {
                let _ = writeln!(
                    multiply,
                    "            let fb{j} = coopLoadT<coop_mat{f}x{f}<f16, B>>(&b_tile[{}], B_LD);",
                    b_at(j)
                );
            }
            for &(i, j) in &frags {
                let _ = writeln!(
                    multiply,
                    "            acc_{i}_{j} = coopMultiplyAdd(fa{i}, fb{j}, acc_{i}_{j});"
                );
            }
        } else {
            for &(i, j) in &frags {
                let _ = writeln!(
                    multiply,
                    "            twin_mma(&acc_{i}_{j}, {}, {}, lane);",
                    a_at(i),
                    b_at(j)
                );
            }
        }
        multiply.push_str("        }\n");
    }

    let mut store = String::new();
    for &(i, j) in &frags {
        let _ = writeln!(
            store,
            "    stash(acc_{i}_{j}, sg, lane);\n    workgroupBarrier();\n    epilogue(sg, lane, z, i0 + sm + {i}u * FRAG, j0 + sn + {j}u * FRAG);\n    workgroupBarrier();"
        );
    }

    let mut flags = vec![if coop { "COOP" } else { "TWIN" }];
    flags.push(match product {
        CoopProduct::Matmul { transpose_b: true } => "TRANS_B",
        CoopProduct::Matmul { transpose_b: false } => "PLAIN_B",
        CoopProduct::Conv => "CONV",
    });
    let mut s = select_sections(TEMPLATE, &flags);
    for (slot, text) in [
        ("{{HEADER}}", header),
        ("{{A_CHUNK}}", a_ty.to_string()),
        ("{{B_CHUNK}}", b_ty.to_string()),
        ("{{A_TILE_LEN}}", t.a_len().to_string()),
        ("{{B_TILE_LEN}}", t.b_len().to_string()),
        ("{{C_FRAG_LEN}}", t.c_len().to_string()),
        ("{{INVOCATIONS}}", inv.to_string()),
        ("{{STAGING}}", staging),
        ("{{ACCUMULATORS}}", acc),
        ("{{REGISTERS}}", regs),
        ("{{FETCH_FIRST}}", fetch("0u", "        ")),
        ("{{PUT_FIRST}}", put("0u", "        ")),
        ("{{FETCH_NEXT}}", fetch("kn", "            ")),
        ("{{MULTIPLY}}", multiply),
        ("{{PUT_NEXT}}", put("nxt", "            ")),
        ("{{STORE}}", store),
    ] {
        s = s.replace(slot, &text);
    }
    Ok(s)
}

/// The variant's shader, generated once per process and kept for its
/// lifetime: the pipeline cache (gpu/kernel.rs) keys modules by a static
/// family name, and the set of variants is small and fixed.
struct Interned {
    family: &'static str,
    source: &'static str,
}

type Key = (CoopTiling, CoopProduct, u32, FragmentMath);

fn interned(key: Key) -> std::result::Result<(&'static str, &'static str), String> {
    static CACHE: Mutex<Option<HashMap<Key, Interned>>> = Mutex::new(None);
    let mut guard = CACHE.lock().expect("shader cache lock poisoned");
    let map = guard.get_or_insert_with(HashMap::new);
    if let Some(i) = map.get(&key) {
        return Ok((i.family, i.source));
    }
    let (t, product, subgroup, math) = key;
    let source = source(&t, product, subgroup, math)?;
    let family = format!(
        "matmul_coop_{}_{}_w{subgroup}{}",
        product.tag(),
        t.name(),
        if math == FragmentMath::Twin {
            "_twin"
        } else {
            ""
        }
    );
    let i = Interned {
        family: Box::leak(family.into_boxed_str()),
        source: Box::leak(source.into_boxed_str()),
    };
    let out = (i.family, i.source);
    map.insert(key, i);
    Ok(out)
}

/// The subgroup width a variant is written for on `gpu`: the tensor
/// cores' one subgroup size, or 32 for the twin (which uses no subgroup
/// operation; 32 is the width of the GPUs it stands in for).
pub(crate) fn subgroup_for(gpu: &Gpu, math: FragmentMath) -> u32 {
    match (math, gpu.coop_matrix()) {
        (FragmentMath::Coop, Some(c)) => c.subgroup_size,
        _ => 32,
    }
}

/// The kernel of one variant on `gpu`. Fails with the reason where the
/// tiling cannot compute the product.
pub(crate) fn kernel(
    gpu: &Gpu,
    t: &CoopTiling,
    product: CoopProduct,
    activation: Activation,
    math: FragmentMath,
) -> std::result::Result<CoopKernel, String> {
    let subgroup = subgroup_for(gpu, math);
    let (family, source) = interned((*t, product, subgroup, math))?;
    let (op, label) = match (product, math) {
        (CoopProduct::Matmul { .. }, FragmentMath::Coop) => ("matmul", "matmul_coop"),
        (CoopProduct::Matmul { .. }, FragmentMath::Twin) => ("matmul", "matmul_coop_twin"),
        (CoopProduct::Conv, FragmentMath::Coop) => ("conv2d", "conv2d_coop"),
        (CoopProduct::Conv, FragmentMath::Twin) => ("conv2d", "conv2d_coop_twin"),
    };
    Ok(CoopKernel {
        op,
        family,
        label,
        source,
        entry: "matmul_coop",
        constants: vec![("ACT", activation.code())],
        needs: t.needs(subgroup),
    })
}

/// Whether `gpu` offers the tiling's fragment shape (f16 x f16 -> f32).
pub(crate) fn fragment_offered(gpu: &Gpu, t: &CoopTiling) -> bool {
    gpu.coop_matrix()
        .is_some_and(|c| c.fragments.contains(&t.frag))
}

/// Whether a dispatch's operand can be read in chunks of `load` halves:
/// its offset, row stride, item stride and contiguous length are multiples
/// of it.
pub(crate) fn aligned(load: u32, off: u32, ld: u32, bstride: u32, len: u32) -> bool {
    load == 1
        || [off, ld, bstride, len]
            .iter()
            .all(|v| v.is_multiple_of(load))
}

/// One tensor-core (or twin) product as an operator dispatches it: the
/// variant, and per dispatch the kernel whose loads suit its alignment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CoopPlan {
    pub tiling: CoopTiling,
    pub product: CoopProduct,
    pub activation: Activation,
    pub math: FragmentMath,
}

impl CoopPlan {
    /// The kernel for a dispatch whose operands can (`aligned`) or cannot
    /// be read in the tiling's chunks; the same tiling either way, so the
    /// result does not depend on it.
    pub(crate) fn kernel(&self, gpu: &Gpu, aligned: bool) -> Result<CoopKernel> {
        let t = if aligned {
            self.tiling
        } else {
            self.tiling.scalar_loads()
        };
        kernel(gpu, &t, self.product, self.activation, self.math).map_err(|why| {
            EngineError::KernelUnavailable {
                op: self.op(),
                kernel: "cooperative-matrix",
                needs: why,
                adapter: gpu.adapter().name.clone(),
                found: "a tiling the template cannot fill".into(),
            }
        })
    }

    fn op(&self) -> &'static str {
        match self.product {
            CoopProduct::Matmul { .. } => "matmul",
            CoopProduct::Conv => "conv2d",
        }
    }

    /// Refuses a plan that cannot run on `gpu` with `dtype` operands, with
    /// what it needs: the variant's workgroup (invocations and workgroup
    /// memory against the adapter's limits, e.g. NVIDIA's 48 KiB), f16,
    /// and for the tensor cores themselves their fragment shape.
    pub(crate) fn check_runs(&self, gpu: &Gpu, dtype: DType) -> Result<()> {
        let k = self.kernel(gpu, true)?;
        let limits = gpu.limits();
        let runs = match self.math {
            FragmentMath::Coop => {
                coop::supported(gpu, dtype, &k.needs) && fragment_offered(gpu, &self.tiling)
            }
            FragmentMath::Twin => {
                dtype == DType::F16
                    && gpu.has_f16()
                    && limits.max_compute_invocations_per_workgroup >= k.needs.invocations
                    && limits.max_compute_workgroup_storage_size >= k.needs.workgroup_bytes
            }
        };
        if runs {
            return Ok(());
        }
        Err(EngineError::KernelUnavailable {
            op: self.op(),
            kernel: match self.math {
                FragmentMath::Coop => "cooperative-matrix",
                FragmentMath::Twin => "cooperative-matrix twin",
            },
            needs: match self.math {
                FragmentMath::Coop => format!(
                    "{} (variant {}, {}x{} fragments)",
                    k.needs.describe(),
                    self.tiling.name(),
                    self.tiling.frag,
                    self.tiling.frag
                ),
                FragmentMath::Twin => format!(
                    "f16 operands, {} invocations and {} bytes of workgroup memory per \
                     workgroup (variant {})",
                    k.needs.invocations,
                    k.needs.workgroup_bytes,
                    self.tiling.name()
                ),
            },
            adapter: gpu.adapter().name.clone(),
            found: format!(
                "{dtype} operands, {} invocations and {} bytes of workgroup memory per \
                 workgroup, fragments {:?}",
                limits.max_compute_invocations_per_workgroup,
                limits.max_compute_workgroup_storage_size,
                gpu.coop_matrix()
                    .map(|c| c.fragments.clone())
                    .unwrap_or_default()
            ),
        })
    }
}

/// The tiling routing runs for `op`'s `class`: the tuning file's choice
/// where it names the tensor cores, else [`CoopTiling::DEFAULT`]. A choice
/// this engine cannot read is an error naming the file, never a silent
/// default.
pub(crate) fn tuned_tiling(gpu: &Gpu, op: &str, class: &str) -> Result<CoopTiling> {
    match gpu.tuned(op, class) {
        Some(v) if v.kernel == KernelName::Coop => CoopTiling::from_constants(&v.constants)
            .map_err(|reason| EngineError::BadTuningFile {
                path: gpu.tuning().path.unwrap_or_default(),
                reason: format!("{op} class `{class}`: {reason}"),
            }),
        _ => Ok(CoopTiling::DEFAULT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_keep_only_the_flagged_ones() {
        let t = "a\n// #if X\nx\n// #endif\n// #if Y\ny\n// #endif\nb\n";
        assert_eq!(select_sections(t, &["X"]), "a\nx\nb\n");
        assert_eq!(select_sections(t, &[]), "a\nb\n");
    }

    #[test]
    fn constants_round_trip_and_refuse_strangers() {
        for t in variant_space() {
            assert_eq!(CoopTiling::from_constants(&t.to_constants()), Ok(t));
        }
        let mut c = CoopTiling::DEFAULT.to_constants();
        c.insert("FAST_STAGING".into(), 1.0);
        assert!(CoopTiling::from_constants(&c)
            .unwrap_err()
            .contains("FAST_STAGING"));
        let mut c = CoopTiling::DEFAULT.to_constants();
        c.remove("LOAD");
        assert!(CoopTiling::from_constants(&c).unwrap_err().contains("LOAD"));
    }

    /// Every tiling of the space fits NVIDIA's 48 KiB and computes every
    /// product with 32-wide subgroups, except the convolution where its
    /// columns outnumber its invocations.
    #[test]
    fn the_variant_space_fits_48_kib() {
        for t in variant_space() {
            assert!(t.workgroup_bytes() <= 48 * 1024, "{}", t.name());
            for product in CoopProduct::ALL {
                t.check(product, 32).unwrap();
            }
        }
    }

    #[test]
    fn the_default_is_the_measured_kernel() {
        let d = CoopTiling::DEFAULT;
        assert_eq!((d.tile_m(), d.tile_n(), d.subgroups()), (128, 128, 8));
        assert_eq!(d.workgroup_bytes(), 2 * (5120 + 4352) + 4 * 2048);
    }
}
