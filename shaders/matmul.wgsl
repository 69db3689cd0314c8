// Batched matrix multiply with a fused epilogue:
//   out[z, i, j] = ACT(alpha * sum_k a[z, i, k] * b[z, k, j] + bias[j])
//
// Bindings (every index below is an element index inside the binding; the
// `*_off` params say where the operand starts, since a window's binding
// offset is aligned down):
//   @binding(0) p     uniform Params
//   @binding(1) a     array<st> (read): z-th item at a_off + z * a_bstride, row i at + i * lda, k contiguous
//   @binding(2) b     array<st> (read): z-th item at b_off + z * b_bstride (0 = one weight shared by all items);
//                     TRANS_B = 0: [K, N], element (k, j) at + k * ldb + j
//                     TRANS_B = 1: [N, K], element (k, j) at + j * ldb + k  (PyTorch nn.Linear weight)
//   @binding(3) bias  array<st> (read): bias[bias_off + j], read only when has_bias = 1
//   @binding(4) out   array<st> (read_write): element (z, i, j) at out_off + z * o_bstride + i * ldo + j
// A product too large for one binding is computed in windows of rows,
// columns and (when even one row does not fit) chunks of K: `accumulate` = 1
// adds to the partial sum already in `out`, and `finish` = 1 marks the last K
// chunk, which adds the bias and applies the activation.

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
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<st>;
@group(0) @binding(2) var<storage, read> b: array<st>;
@group(0) @binding(3) var<storage, read> bias: array<st>;
@group(0) @binding(4) var<storage, read_write> out: array<st>;

// 1: b is [N, K] (nn.Linear's weight layout).
override TRANS_B: u32 = 0u;
// Fused activation: 0 none, 1 SiLU, 2 GELU (erf), 3 GELU (tanh), 4 quick-GELU.
override ACT: u32 = 0u;

fn sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

// erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7): WGSL has no erf.
fn erf_approx(x: f32) -> f32 {
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.3275911 * z);
    let poly = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t;
    return sign(x) * (1.0 - poly * exp(-z * z));
}

fn activate(x: f32) -> f32 {
    switch ACT {
        case 1u: { return x * sigmoid(x); }
        case 2u: { return 0.5 * x * (1.0 + erf_approx(x * 0.7071067811865476)); }
        case 3u: {
            // tanh has saturated long before |u| = 10; the clamp keeps exp() finite on every driver.
            let u = clamp(0.7978845608028654 * (x + 0.044715 * x * x * x), -10.0, 10.0);
            return 0.5 * x * (1.0 + tanh(u));
        }
        case 4u: { return x * sigmoid(1.702 * x); }
        default: { return x; }
    }
}

fn b_index(z: u32, kk: u32, j: u32) -> u32 {
    if (TRANS_B == 1u) {
        return p.b_off + z * p.b_bstride + j * p.ldb + kk;
    }
    return p.b_off + z * p.b_bstride + kk * p.ldb + j;
}

// Writes one finished dot product (the caller checks i < m, j < n).
fn store(z: u32, i: u32, j: u32, dot: f32) {
    let o = p.out_off + z * p.o_bstride + i * p.ldo + j;
    var v = p.alpha * dot;
    if (p.accumulate == 1u) {
        v += f32(out[o]);
    }
    if (p.finish == 1u) {
        if (p.has_bias == 1u) {
            v += f32(bias[p.bias_off + j]);
        }
        v = activate(v);
    }
    out[o] = st(v);
}

// One output per invocation: the plain kernel every faster one is checked against.
@compute @workgroup_size(16, 16)
fn matmul_naive(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let i = gid.y;
    let z = gid.z;
    if (i >= p.m || j >= p.n) {
        return;
    }
    let a_row = p.a_off + z * p.a_bstride + i * p.lda;
    var dot = 0.0;
    for (var kk = 0u; kk < p.k; kk++) {
        dot += f32(a[a_row + kk]) * f32(b[b_index(z, kk, j)]);
    }
    store(z, i, j, dot);
}
