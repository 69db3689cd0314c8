//! Elementwise operators (`shaders/elementwise.wgsl`): SiLU, GELU (erf and
//! tanh), quick-GELU, scale, add and mul with broadcasting (optionally followed
//! by an activation), and GEGLU. Tensors larger than one storage binding are
//! processed in windows.

use bytemuck::{Pod, Zeroable};

use super::{check_dtypes, params_bytes, windows};
use crate::error::{EngineError, Result};
use crate::gpu::{grid_1d, Gpu, Kernel};
use crate::tensor::{fmt_shape, Tensor};

const SOURCE: &str = include_str!("../../../shaders/elementwise.wgsl");
const WG: u64 = 256;
const MAX_RANK: usize = 8;

/// An activation that elementwise kernels (and later fused epilogues) apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    Silu,
    GeluErf,
    GeluTanh,
    QuickGelu,
}

impl Activation {
    /// The `ACT` override constant of the shaders.
    pub(crate) fn code(self) -> f64 {
        match self {
            Activation::None => 0.0,
            Activation::Silu => 1.0,
            Activation::GeluErf => 2.0,
            Activation::GeluTanh => 3.0,
            Activation::QuickGelu => 4.0,
        }
    }

    /// The activation on the CPU, in f64 (the reference).
    pub fn apply_reference(self, x: f64) -> f64 {
        match self {
            Activation::None => x,
            Activation::Silu => x / (1.0 + (-x).exp()),
            Activation::GeluErf => 0.5 * x * (1.0 + erf_reference(x / std::f64::consts::SQRT_2)),
            Activation::GeluTanh => {
                let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
                0.5 * x * (1.0 + u.tanh())
            }
            Activation::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
        }
    }
}

/// erf in f64 by its Taylor series (|x| < 3) or continued fraction: exact to
/// ~1e-15, so it can check the shader's approximation.
pub fn erf_reference(x: f64) -> f64 {
    let z = x.abs();
    let r = if z < 3.0 {
        let mut sum = z;
        let mut term = z;
        let mut n = 0.0;
        loop {
            n += 1.0;
            term *= -z * z / n;
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() < 1e-17 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(z) = exp(-z²)/√π · 1/(z + 1/2/(z + 1/(z + 3/2/(z + ...))))
        let mut f = z;
        for k in (1..60).rev() {
            f = z + (k as f64 / 2.0) / f;
        }
        1.0 - (-z * z).exp() / (std::f64::consts::PI.sqrt() * f)
    };
    r.copysign(x)
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    a_off: u32,
    b_off: u32,
    out_off: u32,
    scale: f32,
    rank: u32,
    base: u32,
    hi: f32,
    shape: [u32; MAX_RANK],
    b_strides: [u32; MAX_RANK],
}

impl Params {
    fn new(n: usize, scale: f32) -> Self {
        Params {
            n: n as u32,
            a_off: 0,
            b_off: 0,
            out_off: 0,
            scale,
            rank: 0,
            base: 0,
            hi: 0.0,
            shape: [1; MAX_RANK],
            b_strides: [0; MAX_RANK],
        }
    }
}

fn kernel(entry: &'static str, x: &Tensor, act: Activation, binop: f64) -> Kernel {
    let mut constants = vec![("ACT", act.code())];
    if entry.starts_with("binary") {
        constants.push(("BINOP", binop));
    }
    Kernel {
        op: "elementwise",
        source: SOURCE,
        entry,
        dtype: x.dtype(),
        constants,
    }
}

/// `act(x * factor)`, elementwise.
pub fn unary(gpu: &Gpu, x: &Tensor, factor: f32, act: Activation) -> Result<Tensor> {
    let out = Tensor::empty(gpu, x.shape(), x.dtype())?;
    let max = Tensor::max_window_elems(gpu, x.dtype());
    for (start, n) in windows("elementwise", x.numel(), 1, max, gpu.max_binding_bytes())? {
        let (ab, a_off) = x.window(gpu, start, n);
        let (ob, out_off) = out.window(gpu, start, n);
        let p = Params {
            a_off,
            out_off,
            ..Params::new(n, factor)
        };
        let vector = all_of_four(&[n as u32, a_off, out_off]);
        let k = kernel(if vector { "unary4" } else { "unary" }, x, act, 0.0);
        gpu.dispatch(&k, params_bytes(&p), &[(1, ab), (3, ob)], grid(n, vector))?;
    }
    Ok(out)
}

/// Whether every count and element offset is a multiple of 4: the vector
/// kernels (`unary4`, `binary4*`, `geglu4`) move st4 values, so every tensor
/// must start on a vector inside its binding.
fn all_of_four(values: &[u32]) -> bool {
    values.iter().all(|v| v % 4 == 0)
}

/// The 1-D grid over `n` elements: one invocation per element, or per four
/// elements for a vector kernel.
fn grid(n: usize, vector: bool) -> [u32; 3] {
    let per_invocation = if vector { 4 } else { 1 };
    grid_1d((n as u64).div_ceil(per_invocation).div_ceil(WG))
}

/// `clamp(x, lo, hi)`, elementwise (e.g. a VAE posterior's logvar to [-30, 20]).
pub fn clamp(gpu: &Gpu, x: &Tensor, lo: f32, hi: f32) -> Result<Tensor> {
    let out = Tensor::empty(gpu, x.shape(), x.dtype())?;
    let k = kernel("clamp_range", x, Activation::None, 0.0);
    let max = Tensor::max_window_elems(gpu, x.dtype());
    for (start, n) in windows("clamp", x.numel(), 1, max, gpu.max_binding_bytes())? {
        let (ab, a_off) = x.window(gpu, start, n);
        let (ob, out_off) = out.window(gpu, start, n);
        let p = Params {
            a_off,
            out_off,
            hi,
            ..Params::new(n, lo)
        };
        gpu.dispatch(
            &k,
            params_bytes(&p),
            &[(1, ab), (3, ob)],
            grid_1d((n as u64).div_ceil(WG)),
        )?;
    }
    Ok(out)
}

pub fn silu(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    unary(gpu, x, 1.0, Activation::Silu)
}

pub fn gelu_erf(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    unary(gpu, x, 1.0, Activation::GeluErf)
}

pub fn gelu_tanh(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    unary(gpu, x, 1.0, Activation::GeluTanh)
}

pub fn quick_gelu(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    unary(gpu, x, 1.0, Activation::QuickGelu)
}

pub fn scale(gpu: &Gpu, x: &Tensor, factor: f32) -> Result<Tensor> {
    unary(gpu, x, factor, Activation::None)
}

/// Strides of `b` (right-aligned numpy broadcasting into `out_shape`), or
/// `None` if the shapes do not broadcast.
fn broadcast_strides(out_shape: &[usize], b_shape: &[usize]) -> Option<Vec<u32>> {
    if b_shape.len() > out_shape.len() {
        return None;
    }
    let lead = out_shape.len() - b_shape.len();
    let mut strides = vec![0u32; out_shape.len()];
    let mut stride = 1usize;
    for d in (0..out_shape.len()).rev() {
        let bdim = if d >= lead { b_shape[d - lead] } else { 1 };
        if bdim == out_shape[d] && bdim != 1 {
            strides[d] = stride as u32;
        } else if bdim != 1 {
            return None;
        }
        stride *= bdim;
    }
    Some(strides)
}

/// `act((a op b) * factor)` where `b` broadcasts into `a`'s shape.
pub fn binary(
    gpu: &Gpu,
    a: &Tensor,
    b: &Tensor,
    mul: bool,
    factor: f32,
    act: Activation,
) -> Result<Tensor> {
    check_dtypes("elementwise", &[a, b])?;
    let strides = broadcast_strides(a.shape(), b.shape()).ok_or_else(|| EngineError::Shape {
        op: "elementwise",
        expected: format!(
            "a second operand that broadcasts to {}",
            fmt_shape(a.shape())
        ),
        found: fmt_shape(b.shape()),
    })?;
    // Collapse leading dims so that any rank fits the kernel's 8.
    let (shape, strides) = collapse(a.shape(), &strides);
    if shape.len() > MAX_RANK {
        return Err(EngineError::Argument {
            op: "elementwise",
            message: format!(
                "broadcast over more than {MAX_RANK} distinct dims: {}",
                fmt_shape(a.shape())
            ),
        });
    }
    let out = Tensor::empty(gpu, a.shape(), a.dtype())?;
    let binop = if mul { 1.0 } else { 0.0 };
    let same_shape = a.shape() == b.shape();
    // The vector kernel reads a broadcast b four elements at a time along the
    // innermost dim, so that dim must hold whole groups of four.
    let inner_of_four = same_shape || shape.last().is_some_and(|&d| d % 4 == 0);
    let max = Tensor::max_window_elems(gpu, a.dtype());
    for (start, n) in windows("elementwise", a.numel(), 1, max, gpu.max_binding_bytes())? {
        let (ab, a_off) = a.window(gpu, start, n);
        let (ob, out_off) = out.window(gpu, start, n);
        // A same-shape operand is windowed with `a`; a broadcast one is bound whole.
        let (bb, b_off, base) = if same_shape {
            let (bb, off) = b.window(gpu, start, n);
            (bb, off, 0)
        } else {
            (b.binding(), 0, start as u32)
        };
        let mut p = Params {
            a_off,
            b_off,
            out_off,
            base,
            ..Params::new(n, factor)
        };
        if same_shape {
            p.rank = 1;
            p.shape[0] = u32::MAX;
            p.b_strides[0] = 1;
        } else {
            p.rank = shape.len() as u32;
            p.shape[..shape.len()].copy_from_slice(&shape);
            p.b_strides[..shape.len()].copy_from_slice(&strides);
        }
        let vector = inner_of_four && all_of_four(&[n as u32, a_off, b_off, out_off, start as u32]);
        let entry = match (vector, same_shape) {
            (false, _) => "binary",
            (true, true) => "binary4",
            (true, false) => "binary4_broadcast",
        };
        let k = kernel(entry, a, act, binop);
        gpu.dispatch(
            &k,
            params_bytes(&p),
            &[(1, ab), (2, bb), (3, ob)],
            grid(n, vector),
        )?;
    }
    Ok(out)
}

/// Merges neighbouring dims whose broadcast behaviour is the same.
fn collapse(shape: &[usize], strides: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let mut s: Vec<u32> = Vec::new();
    let mut st: Vec<u32> = Vec::new();
    for (&d, &t) in shape.iter().zip(strides) {
        if d == 1 {
            continue;
        }
        if let (Some(ls), Some(&lt)) = (s.last_mut(), st.last()) {
            // Two broadcast dims, or two contiguous dims of b, merge.
            if (lt == 0 && t == 0) || (lt != 0 && t != 0 && lt == t * d as u32) {
                *ls *= d as u32;
                *st.last_mut().expect("same length as s") = t;
                continue;
            }
        }
        s.push(d as u32);
        st.push(t);
    }
    if s.is_empty() {
        s.push(1);
        st.push(0);
    }
    (s, st)
}

/// `a + b` (b broadcasts into a's shape).
pub fn add(gpu: &Gpu, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(gpu, a, b, false, 1.0, Activation::None)
}

/// `a * b` (b broadcasts into a's shape).
pub fn mul(gpu: &Gpu, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(gpu, a, b, true, 1.0, Activation::None)
}

/// GEGLU: for x of shape [..., 2·D], `x[..., :D] * gelu_erf(x[..., D:])`.
pub fn geglu(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    let last = *x.shape().last().unwrap_or(&0);
    if x.rank() == 0 || !last.is_multiple_of(2) || last == 0 {
        return Err(EngineError::Shape {
            op: "geglu",
            expected: "a last dim of even size 2·D".into(),
            found: fmt_shape(x.shape()),
        });
    }
    let d = last / 2;
    let mut out_shape = x.shape().to_vec();
    *out_shape.last_mut().expect("rank checked") = d;
    let out = Tensor::empty(gpu, &out_shape, x.dtype())?;
    let rows = x.numel() / last;
    let max_rows = Tensor::max_window_elems(gpu, x.dtype()) / last;
    for (row0, nrows) in windows("geglu", rows, 1, max_rows, gpu.max_binding_bytes())? {
        let (ab, a_off) = x.window(gpu, row0 * last, nrows * last);
        let (ob, out_off) = out.window(gpu, row0 * d, nrows * d);
        let n = nrows * d;
        let p = Params {
            a_off,
            out_off,
            rank: d as u32,
            ..Params::new(n, 1.0)
        };
        let vector = all_of_four(&[d as u32, a_off, out_off]);
        let k = kernel(
            if vector { "geglu4" } else { "geglu" },
            x,
            Activation::None,
            0.0,
        );
        gpu.dispatch(&k, params_bytes(&p), &[(1, ab), (3, ob)], grid(n, vector))?;
    }
    Ok(out)
}

/// CPU reference of [`binary`]: a and b row-major, b broadcasting into a.
pub fn binary_reference(
    a: &[f32],
    a_shape: &[usize],
    b: &[f32],
    b_shape: &[usize],
    mul: bool,
    factor: f32,
    act: Activation,
) -> Vec<f32> {
    let strides =
        broadcast_strides(a_shape, b_shape).expect("reference called with broadcastable shapes");
    let mut out = Vec::with_capacity(a.len());
    for (i, &x) in a.iter().enumerate() {
        let mut rem = i;
        let mut bi = 0usize;
        for d in (0..a_shape.len()).rev() {
            bi += (rem % a_shape[d]) * strides[d] as usize;
            rem /= a_shape[d];
        }
        let (x, y) = (x as f64, b[bi] as f64);
        let r = if mul { x * y } else { x + y };
        out.push(act.apply_reference(r * factor as f64) as f32);
    }
    out
}

/// CPU reference of [`geglu`].
pub fn geglu_reference(x: &[f32], last: usize) -> Vec<f32> {
    let d = last / 2;
    x.chunks(last)
        .flat_map(|row| {
            (0..d).map(move |c| {
                (row[c] as f64 * Activation::GeluErf.apply_reference(row[d + c] as f64)) as f32
            })
        })
        .collect()
}

/// Which three-operand form [`three_operand`] runs.
#[derive(Clone, Copy)]
enum ThreeOperand {
    Modulate,
    GatedAdd,
}

/// `x · (1 + scale) + shift` (a DiT block's adaptive-norm modulation,
/// diffusers' `norm(x) * (1 + scale_msa) + shift_msa`): `scale` and `shift`
/// of one shape that broadcasts into x's.
pub fn modulate(gpu: &Gpu, x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    if scale.shape() != shift.shape() {
        return Err(EngineError::Shape {
            op: "modulate",
            expected: format!("shift of scale's shape {}", fmt_shape(scale.shape())),
            found: fmt_shape(shift.shape()),
        });
    }
    three_operand(gpu, "modulate", ThreeOperand::Modulate, x, scale, shift)
}

/// `x + y · gate` (a DiT block's gated residual, diffusers' `hidden_states +
/// attn_output * gate_msa`): `y` of x's shape, `gate` broadcasting into it.
pub fn gated_add(gpu: &Gpu, x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    if y.shape() != x.shape() {
        return Err(EngineError::Shape {
            op: "gated_add",
            expected: format!("y of x's shape {}", fmt_shape(x.shape())),
            found: fmt_shape(y.shape()),
        });
    }
    three_operand(gpu, "gated_add", ThreeOperand::GatedAdd, x, gate, y)
}

/// Runs `modulate` (a, b = scale, c = shift) or `gated_add` (a = x, b =
/// gate, c = y): `b` broadcasts into `a`; `c` has b's shape (modulate) or
/// a's (gated_add).
fn three_operand(
    gpu: &Gpu,
    op: &'static str,
    form: ThreeOperand,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
) -> Result<Tensor> {
    check_dtypes(op, &[a, b, c])?;
    let strides = broadcast_strides(a.shape(), b.shape()).ok_or_else(|| EngineError::Shape {
        op,
        expected: format!("an operand that broadcasts to {}", fmt_shape(a.shape())),
        found: fmt_shape(b.shape()),
    })?;
    let (shape, strides) = collapse(a.shape(), &strides);
    if shape.len() > MAX_RANK {
        return Err(EngineError::Argument {
            op,
            message: format!(
                "broadcast over more than {MAX_RANK} distinct dims: {}",
                fmt_shape(a.shape())
            ),
        });
    }
    let entry = match form {
        ThreeOperand::Modulate => "modulate",
        ThreeOperand::GatedAdd => "gated_add",
    };
    let out = Tensor::empty(gpu, a.shape(), a.dtype())?;
    let k = kernel(entry, a, Activation::None, 0.0);
    let max = Tensor::max_window_elems(gpu, a.dtype());
    for (start, n) in windows(op, a.numel(), 1, max, gpu.max_binding_bytes())? {
        let (ab, a_off) = a.window(gpu, start, n);
        let (ob, out_off) = out.window(gpu, start, n);
        // gated_add's y is windowed with x (its offset travels in b_off);
        // modulate's shift is bound whole like the scale.
        let (cb, c_off) = match form {
            ThreeOperand::Modulate => (c.binding(), 0),
            ThreeOperand::GatedAdd => c.window(gpu, start, n),
        };
        let mut p = Params {
            a_off,
            b_off: c_off,
            out_off,
            base: start as u32,
            rank: shape.len() as u32,
            ..Params::new(n, 1.0)
        };
        p.shape[..shape.len()].copy_from_slice(&shape);
        p.b_strides[..shape.len()].copy_from_slice(&strides);
        gpu.dispatch(
            &k,
            params_bytes(&p),
            &[(1, ab), (2, b.binding()), (3, ob), (4, cb)],
            grid_1d((n as u64).div_ceil(WG)),
        )?;
    }
    Ok(out)
}

/// The index into a broadcast operand of every element of `a_shape`.
fn broadcast_indices(a_shape: &[usize], b_shape: &[usize]) -> Vec<usize> {
    let strides =
        broadcast_strides(a_shape, b_shape).expect("reference called with broadcastable shapes");
    let n: usize = a_shape.iter().product();
    (0..n)
        .map(|i| {
            let mut rem = i;
            let mut bi = 0usize;
            for d in (0..a_shape.len()).rev() {
                bi += (rem % a_shape[d]) * strides[d] as usize;
                rem /= a_shape[d];
            }
            bi
        })
        .collect()
}

/// CPU reference of [`modulate`] in f64.
pub fn modulate_reference(
    x: &[f32],
    x_shape: &[usize],
    scale: &[f32],
    shift: &[f32],
    scale_shape: &[usize],
) -> Vec<f32> {
    broadcast_indices(x_shape, scale_shape)
        .into_iter()
        .zip(x)
        .map(|(j, &v)| (v as f64 * (1.0 + scale[j] as f64) + shift[j] as f64) as f32)
        .collect()
}

/// CPU reference of [`gated_add`] in f64.
pub fn gated_add_reference(
    x: &[f32],
    x_shape: &[usize],
    y: &[f32],
    gate: &[f32],
    gate_shape: &[usize],
) -> Vec<f32> {
    broadcast_indices(x_shape, gate_shape)
        .into_iter()
        .zip(x.iter().zip(y))
        .map(|(j, (&v, &w))| (v as f64 + w as f64 * gate[j] as f64) as f32)
        .collect()
}
