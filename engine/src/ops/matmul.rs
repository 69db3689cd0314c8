//! Matrix multiply and nn.Linear (`shaders/matmul.wgsl`): batched `a @ b` or
//! `a @ bᵀ`, with alpha, a per-column bias and an activation fused into the
//! store. Operands larger than one storage binding are computed in windows of
//! rows, columns and, when one row alone is too long, chunks of K.

use bytemuck::{Pod, Zeroable};

use super::{check_dtypes, params_bytes, Activation};
use crate::error::{EngineError, Result};
use crate::gpu::{Binding, Gpu, Kernel};
use crate::tensor::{fmt_shape, Tensor};

const SOURCE: &str = include_str!("../../../shaders/matmul.wgsl");
const MAX_GROUPS: usize = 65535;

/// Options of [`matmul`]; the default is a plain `a @ b`.
#[derive(Debug, Clone, Copy)]
pub struct MatmulOptions<'a> {
    /// `b` is stored `[batch..., N, K]` (nn.Linear's weight layout).
    pub transpose_b: bool,
    /// Added to every row: shape `[N]`.
    pub bias: Option<&'a Tensor>,
    pub activation: Activation,
    /// Scales the product before the bias (attention's 1/√d).
    pub alpha: f32,
}

impl Default for MatmulOptions<'_> {
    fn default() -> Self {
        MatmulOptions {
            transpose_b: false,
            bias: None,
            activation: Activation::None,
            alpha: 1.0,
        }
    }
}

/// Which kernel computes the product. `Auto` picks by adapter; the others
/// exist so that tests check every kernel on any adapter.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulKernel {
    Auto,
    Naive,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    a_off: u32,
    b_off: u32,
    bias_off: u32,
    out_off: u32,
    a_bstride: u32,
    b_bstride: u32,
    o_bstride: u32,
    lda: u32,
    ldb: u32,
    ldo: u32,
    alpha: f32,
    has_bias: u32,
    accumulate: u32,
    finish: u32,
    _pad: [u32; 2],
}

/// The product's sizes after validation. A `b` without batch dims is shared
/// by every item, so the items are folded into the rows of one product.
#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    b_batched: bool,
    transpose_b: bool,
}

/// Output rows and columns one workgroup of a kernel covers.
struct Variant {
    entry: &'static str,
    rows: usize,
    cols: usize,
}

fn variant(_gpu: &Gpu, kernel: MatmulKernel) -> Variant {
    match kernel {
        MatmulKernel::Auto | MatmulKernel::Naive => Variant {
            entry: "matmul_naive",
            rows: 16,
            cols: 16,
        },
    }
}

/// `act(alpha · a @ b + bias)`.
///
/// `a` is `[batch..., M, K]`; `b` is `[batch..., K, N]`, or `[batch..., N, K]`
/// with `transpose_b`. `b`'s batch dims may be absent (one weight shared by
/// every item) or equal to `a`'s. The result is `[batch..., M, N]`.
pub fn matmul(gpu: &Gpu, a: &Tensor, b: &Tensor, opts: &MatmulOptions) -> Result<Tensor> {
    matmul_with_kernel(gpu, a, b, opts, MatmulKernel::Auto)
}

/// [`matmul`] with a chosen kernel (for tests and benchmarks).
#[doc(hidden)]
pub fn matmul_with_kernel(
    gpu: &Gpu,
    a: &Tensor,
    b: &Tensor,
    opts: &MatmulOptions,
    kernel: MatmulKernel,
) -> Result<Tensor> {
    let (dims, out_shape) = check_matmul("matmul", a, b, opts)?;
    run(gpu, a, b, opts, dims, &out_shape, variant(gpu, kernel))
}

/// PyTorch's `nn.Linear`: `x [..., K]`, `weight [N, K]`, `bias [N]` →
/// `act(x @ weightᵀ + bias)` of shape `[..., N]`.
pub fn linear(
    gpu: &Gpu,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    activation: Activation,
) -> Result<Tensor> {
    let k = match x.shape().last() {
        Some(&k) => k,
        None => {
            return Err(EngineError::Shape {
                op: "linear",
                expected: "x of shape [..., K]".into(),
                found: fmt_shape(x.shape()),
            })
        }
    };
    if weight.rank() != 2 || weight.shape()[1] != k {
        return Err(EngineError::Shape {
            op: "linear",
            expected: format!(
                "weight of shape [N, {k}] for x of shape {}",
                fmt_shape(x.shape())
            ),
            found: fmt_shape(weight.shape()),
        });
    }
    let rows = x.numel() / k.max(1);
    let x2 = x.reshape(&[rows, k])?;
    let opts = MatmulOptions {
        transpose_b: true,
        bias,
        activation,
        alpha: 1.0,
    };
    let (dims, _) = check_matmul("linear", &x2, weight, &opts)?;
    let mut out_shape = x.shape().to_vec();
    *out_shape.last_mut().expect("x has rank >= 1") = weight.shape()[0];
    run(
        gpu,
        &x2,
        weight,
        &opts,
        dims,
        &out_shape,
        variant(gpu, MatmulKernel::Auto),
    )
}

fn check_matmul(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    opts: &MatmulOptions,
) -> Result<(Dims, Vec<usize>)> {
    let mut tensors = vec![a, b];
    tensors.extend(opts.bias);
    check_dtypes(op, &tensors)?;
    if a.rank() < 2 {
        return Err(EngineError::Shape {
            op,
            expected: "a of shape [batch..., M, K]".into(),
            found: fmt_shape(a.shape()),
        });
    }
    let (a_batch, mk) = a.shape().split_at(a.rank() - 2);
    let (m, k) = (mk[0], mk[1]);
    let layout = if opts.transpose_b { "N, K" } else { "K, N" };
    let b_error = || EngineError::Shape {
        op,
        expected: format!(
            "b of shape [{layout}] with K = {k}, batch dims absent or equal to a's (a is {})",
            fmt_shape(a.shape())
        ),
        found: fmt_shape(b.shape()),
    };
    if b.rank() < 2 {
        return Err(b_error());
    }
    let (b_batch, b_mat) = b.shape().split_at(b.rank() - 2);
    let (b_k, n) = if opts.transpose_b {
        (b_mat[1], b_mat[0])
    } else {
        (b_mat[0], b_mat[1])
    };
    let b_batched = !b_batch.is_empty();
    if b_k != k || (b_batched && b_batch != a_batch) {
        return Err(b_error());
    }
    if let Some(bias) = opts.bias {
        if bias.shape() != [n] {
            return Err(EngineError::Shape {
                op,
                expected: format!("bias of shape [{n}]"),
                found: fmt_shape(bias.shape()),
            });
        }
    }
    let batch: usize = a_batch.iter().product();
    let mut out_shape = a_batch.to_vec();
    out_shape.extend([m, n]);
    let dims = if b_batched {
        Dims {
            batch,
            m,
            k,
            n,
            b_batched,
            transpose_b: opts.transpose_b,
        }
    } else {
        Dims {
            batch: 1,
            m: batch * m,
            k,
            n,
            b_batched,
            transpose_b: opts.transpose_b,
        }
    };
    Ok((dims, out_shape))
}

/// How the product is cut into dispatches: `items` batch items at a time
/// (only when whole items fit), else windows of `rows` x `cols` outputs over
/// `depth` values of K.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tiling {
    items: usize,
    rows: usize,
    cols: usize,
    depth: usize,
}

/// Picks the largest windows that fit one binding of `max` elements and a
/// dispatch of at most 65535 workgroups per dimension.
fn tiling(d: &Dims, max: usize, v: &Variant) -> Tiling {
    let max_rows = MAX_GROUPS * v.rows;
    let max_cols = MAX_GROUPS * v.cols;
    let (a_item, b_item, o_item) = (d.m * d.k, d.k * d.n, d.m * d.n);
    if a_item <= max && b_item <= max && o_item <= max && d.m <= max_rows && d.n <= max_cols {
        let mut items = d.batch.min(MAX_GROUPS);
        for size in [a_item, o_item, if d.b_batched { b_item } else { 0 }] {
            items = items.min(max / size.max(1));
        }
        return Tiling {
            items: items.max(1),
            rows: d.m,
            cols: d.n,
            depth: d.k,
        };
    }
    // Rows of K first: a window of `a` and of a transposed `b` needs a whole
    // row of each; a plain `b` needs `depth` of its rows. (An empty K is
    // windowed as if it were 1.)
    let k = d.k.max(1);
    let depth = if d.transpose_b {
        k.min(max)
    } else {
        k.min((max - 1) / d.n + 1)
    };
    let cols = if d.transpose_b {
        (max - depth) / k + 1
    } else {
        max - (depth - 1) * d.n
    };
    let cols = cols.min(d.n).min(max_cols);
    let rows = ((max - depth) / k + 1)
        .min((max - cols) / d.n + 1)
        .min(d.m)
        .min(max_rows);
    Tiling {
        items: 1,
        rows,
        cols,
        depth,
    }
}

/// Element start and count of the window holding a block of `rows` x `cols`
/// values at (`row0`, `col0`) of a matrix at `base` whose rows are `stride` apart.
fn span(
    base: usize,
    stride: usize,
    row0: usize,
    col0: usize,
    rows: usize,
    cols: usize,
) -> (usize, usize) {
    (base + row0 * stride + col0, (rows - 1) * stride + cols)
}

fn run(
    gpu: &Gpu,
    a: &Tensor,
    b: &Tensor,
    opts: &MatmulOptions,
    d: Dims,
    out_shape: &[usize],
    v: Variant,
) -> Result<Tensor> {
    let out = Tensor::empty(gpu, out_shape, a.dtype())?;
    if d.batch == 0 || d.m == 0 || d.n == 0 {
        return Ok(out);
    }
    let max = Tensor::max_window_elems(gpu, a.dtype());
    let t = tiling(&d, max, &v);
    let k = Kernel {
        op: "matmul",
        source: SOURCE,
        entry: v.entry,
        dtype: a.dtype(),
        constants: vec![
            ("TRANS_B", if d.transpose_b { 1.0 } else { 0.0 }),
            ("ACT", opts.activation.code()),
        ],
    };
    let ldb = if d.transpose_b { d.k } else { d.n };
    let (a_item, b_item, o_item) = (d.m * d.k, d.k * d.n, d.m * d.n);
    let b_stride = if d.b_batched { b_item } else { 0 };
    let k_chunks: Vec<usize> = (0..d.k.max(1)).step_by(t.depth.max(1)).collect();
    for z0 in (0..d.batch).step_by(t.items) {
        let items = t.items.min(d.batch - z0);
        for j0 in (0..d.n).step_by(t.cols) {
            let cols = t.cols.min(d.n - j0);
            for i0 in (0..d.m).step_by(t.rows) {
                let rows = t.rows.min(d.m - i0);
                for (chunk, &k0) in k_chunks.iter().enumerate() {
                    let depth = t.depth.min(d.k - k0);
                    // Several items are only windowed together when whole.
                    let (a_start, a_count) = span(z0 * a_item, d.k, i0, k0, rows, depth);
                    let (o_start, o_count) = span(z0 * o_item, d.n, i0, j0, rows, cols);
                    let (b_start, b_count) = if d.transpose_b {
                        span(z0 * b_stride, d.k, j0, k0, cols, depth)
                    } else {
                        span(z0 * b_stride, d.n, k0, j0, depth.max(1), cols)
                    };
                    let extra = items - 1;
                    // With K = 0 there is nothing to window (the sum is empty).
                    let ((ab, a_off), (bb, b_off)) = if d.k == 0 {
                        ((a.binding(), 0), (b.binding(), 0))
                    } else {
                        (
                            a.window(gpu, a_start, a_count + extra * a_item),
                            b.window(gpu, b_start, b_count + extra * b_stride),
                        )
                    };
                    let (ob, out_off) = out.window(gpu, o_start, o_count + extra * o_item);
                    let (biasb, bias_off): (Binding, u32) = match opts.bias {
                        Some(bias) => bias.window(gpu, j0, cols),
                        // Unused by the kernel, but every binding needs a buffer.
                        None => (ab, 0),
                    };
                    let p = Params {
                        m: rows as u32,
                        n: cols as u32,
                        k: depth as u32,
                        batch: items as u32,
                        a_off,
                        b_off,
                        bias_off,
                        out_off,
                        a_bstride: a_item as u32,
                        b_bstride: b_stride as u32,
                        o_bstride: o_item as u32,
                        lda: d.k as u32,
                        ldb: ldb as u32,
                        ldo: d.n as u32,
                        alpha: opts.alpha,
                        has_bias: opts.bias.is_some() as u32,
                        accumulate: (chunk > 0) as u32,
                        finish: (chunk + 1 == k_chunks.len()) as u32,
                        _pad: [0; 2],
                    };
                    gpu.dispatch(
                        &k,
                        params_bytes(&p),
                        &[(1, ab), (2, bb), (3, biasb), (4, ob)],
                        [
                            cols.div_ceil(v.cols) as u32,
                            rows.div_ceil(v.rows) as u32,
                            items as u32,
                        ],
                    )?;
                }
            }
        }
    }
    Ok(out)
}

/// CPU reference of [`matmul`] in f64 accumulation. Shapes as in
/// [`matmul`]; `bias` holds the bias values (`opts.bias` is not read).
pub fn matmul_reference(
    a: &[f32],
    a_shape: &[usize],
    b: &[f32],
    b_shape: &[usize],
    bias: Option<&[f32]>,
    opts: &MatmulOptions,
) -> Vec<f32> {
    let r = a_shape.len();
    let (m, k) = (a_shape[r - 2], a_shape[r - 1]);
    let rb = b_shape.len();
    let n = if opts.transpose_b {
        b_shape[rb - 2]
    } else {
        b_shape[rb - 1]
    };
    let batch: usize = a_shape[..r - 2].iter().product();
    let b_stride = if rb > 2 { k * n } else { 0 };
    let mut out = Vec::with_capacity(batch * m * n);
    for z in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let mut dot = 0f64;
                for kk in 0..k {
                    let bv = if opts.transpose_b {
                        b[z * b_stride + j * k + kk]
                    } else {
                        b[z * b_stride + kk * n + j]
                    };
                    dot += a[(z * m + i) * k + kk] as f64 * bv as f64;
                }
                let mut v = dot * opts.alpha as f64;
                if let Some(bias) = bias {
                    v += bias[j] as f64;
                }
                out.push(opts.activation.apply_reference(v) as f32);
            }
        }
    }
    out
}
