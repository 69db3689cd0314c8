// Elementwise operators: activations, scale, add/mul with broadcasting, GEGLU.
//
// Bindings:
//   @binding(0) p    uniform Params
//   @binding(1) a    array<st> (read): the input; for `binary` it has the output's shape
//   @binding(2) b    array<st> (read), `binary` only: broadcast into a's shape by `b_strides`
//   @binding(3) out  array<st> (write)
// `*_off` are element offsets of each tensor inside its (aligned) binding;
// `base` is the global index of out's first element when a large tensor is
// processed in windows. The dispatch is 1-D over `n` outputs, spread over x
// and y (at most 65535 workgroups per dimension).

struct Params {
    n: u32,
    a_off: u32,
    b_off: u32,
    out_off: u32,
    scale: f32,
    rank: u32,      // binary: rank of the output shape (<= 8); geglu: D
    base: u32,
    hi: f32,        // clamp: upper bound (`scale` is the lower one)
    shape: array<vec4<u32>, 2>,      // output shape, dims 0..rank
    b_strides: array<vec4<u32>, 2>,  // b's element stride per output dim, 0 = broadcast
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<st>;
@group(0) @binding(2) var<storage, read> b: array<st>;
@group(0) @binding(3) var<storage, read_write> out: array<st>;

const WG: u32 = 256u;

// Activation applied by `unary` and after `binary`: a compile-time choice.
// 0 none, 1 SiLU, 2 GELU (erf), 3 GELU (tanh), 4 quick-GELU (CLIP).
override ACT: u32 = 0u;
// Binary operator: 0 add, 1 mul.
override BINOP: u32 = 0u;

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

fn gelu_erf(x: f32) -> f32 {
    return 0.5 * x * (1.0 + erf_approx(x * 0.7071067811865476));
}

fn gelu_tanh(x: f32) -> f32 {
    // tanh has saturated long before |u| = 10; the clamp keeps exp() finite on every driver.
    let u = clamp(0.7978845608028654 * (x + 0.044715 * x * x * x), -10.0, 10.0);
    return 0.5 * x * (1.0 + tanh(u));
}

fn activate(x: f32) -> f32 {
    switch ACT {
        case 1u: { return x * sigmoid(x); }
        case 2u: { return gelu_erf(x); }
        case 3u: { return gelu_tanh(x); }
        case 4u: { return x * sigmoid(1.702 * x); }
        default: { return x; }
    }
}

fn linear_index(wid: vec3<u32>, lid: u32, nwg: vec3<u32>) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

// out = ACT(a * scale)
@compute @workgroup_size(WG)
fn unary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
         @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(wid, lid, nwg);
    if (i >= p.n) { return; }
    out[p.out_off + i] = st(activate(f32(a[p.a_off + i]) * p.scale));
}

fn b_index(i: u32) -> u32 {
    var rem = i;
    var idx = 0u;
    for (var d = i32(p.rank) - 1; d >= 0; d = d - 1) {
        let dim = p.shape[d / 4][d % 4];
        idx = idx + (rem % dim) * p.b_strides[d / 4][d % 4];
        rem = rem / dim;
    }
    return idx;
}

// out = ACT((a op b) * scale)
@compute @workgroup_size(WG)
fn binary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(wid, lid, nwg);
    if (i >= p.n) { return; }
    let x = f32(a[p.a_off + i]);
    let y = f32(b[p.b_off + b_index(p.base + i)]);
    var r: f32;
    if (BINOP == 1u) { r = x * y; } else { r = x + y; }
    out[p.out_off + i] = st(activate(r * p.scale));
}

// Vector forms of `unary`, `binary` and `geglu`, taken when every offset, the
// element count (and, for `binary` with broadcasting, the innermost dim of the
// output shape; for `geglu`, D) is a multiple of 4. On the CPU adapter every
// storage access costs about the same whatever its width, so moving a vec4 per
// access does a quarter of the scalar kernels' accesses; each component goes
// through the same scalar arithmetic, so the results are those of the scalar
// kernels bit for bit.
//   @binding(1) a4    a as array<st4>
//   @binding(2) b4    b as array<st4>, `binary4` (b of a's shape) only
//   @binding(3) out4  out as array<st4>
// The grid covers n / 4 vectors; i is a vector index, 4i the element index.
@group(0) @binding(1) var<storage, read> a4: array<st4>;
@group(0) @binding(2) var<storage, read> b4: array<st4>;
@group(0) @binding(3) var<storage, read_write> out4: array<st4>;

fn activate4(v: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(activate(v.x), activate(v.y), activate(v.z), activate(v.w));
}

@compute @workgroup_size(WG)
fn unary4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(wid, lid, nwg);
    if (i >= p.n / 4u) { return; }
    out4[p.out_off / 4u + i] = st4(activate4(vec4<f32>(a4[p.a_off / 4u + i]) * p.scale));
}

// `binary4`: b of a's shape, read as vectors. `binary4_broadcast`: b read as
// four scalars from one index computation: the innermost output dim is a
// multiple of 4, so the four elements differ only in that dim, where b's
// stride is 0 or 1. (Two entry points: one may not bind both b and b4.)
fn binary_op4(x: vec4<f32>, y: vec4<f32>) -> vec4<f32> {
    var r: vec4<f32>;
    if (BINOP == 1u) { r = x * y; } else { r = x + y; }
    return activate4(r * p.scale);
}

@compute @workgroup_size(WG)
fn binary4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
           @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(wid, lid, nwg);
    if (i >= p.n / 4u) { return; }
    let x = vec4<f32>(a4[p.a_off / 4u + i]);
    let y = vec4<f32>(b4[p.b_off / 4u + i]);
    out4[p.out_off / 4u + i] = st4(binary_op4(x, y));
}

@compute @workgroup_size(WG)
fn binary4_broadcast(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
                     @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(wid, lid, nwg);
    if (i >= p.n / 4u) { return; }
    let x = vec4<f32>(a4[p.a_off / 4u + i]);
    let j = p.b_off + b_index(p.base + 4u * i);
    let inner = p.b_strides[(p.rank - 1u) / 4u][(p.rank - 1u) % 4u];
    let y = vec4<f32>(f32(b[j]), f32(b[j + inner]), f32(b[j + 2u * inner]), f32(b[j + 3u * inner]));
    out4[p.out_off / 4u + i] = st4(binary_op4(x, y));
}

@compute @workgroup_size(WG)
fn geglu4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(wid, lid, nwg);
    if (i >= p.n / 4u) { return; }
    let d4 = p.rank / 4u;
    let row = i / d4;
    let col = i - row * d4;
    let value = vec4<f32>(a4[p.a_off / 4u + row * 2u * d4 + col]);
    let gate = vec4<f32>(a4[p.a_off / 4u + row * 2u * d4 + d4 + col]);
    let g = vec4<f32>(gelu_erf(gate.x), gelu_erf(gate.y), gelu_erf(gate.z), gelu_erf(gate.w));
    out4[p.out_off / 4u + i] = st4(value * g);
}

// out = clamp(a, scale, hi)
@compute @workgroup_size(WG)
fn clamp_range(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(wid, lid, nwg);
    if (i >= p.n) { return; }
    out[p.out_off + i] = st(clamp(f32(a[p.a_off + i]), p.scale, p.hi));
}

// out = value * gelu_erf(gate), where [value, gate] are the two halves of a's
// last dim (diffusers' GEGLU: `hidden, gate = proj(x).chunk(2, -1)`).
@compute @workgroup_size(WG)
fn geglu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
         @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(wid, lid, nwg);
    if (i >= p.n) { return; }
    let d = p.rank;
    let row = i / d;
    let col = i - row * d;
    let value = f32(a[p.a_off + row * 2u * d + col]);
    let gate = f32(a[p.a_off + row * 2u * d + d + col]);
    out[p.out_off + i] = st(value * gelu_erf(gate));
}

// Three-operand forms of a DiT block's adaptive norm (diffusers' Wan blocks):
//   @binding(4) c    array<st> (read), `modulate` and `gated_add` only
// `modulate`:  out = a * (1 + b) + c, b (scale) and c (shift) of one shape,
//              both broadcast into a's by `b_strides` and bound whole.
// `gated_add`: out = a + c * b, c of a's shape (windowed with it), b (the
//              gate) broadcast by `b_strides` and bound whole.
@group(0) @binding(4) var<storage, read> c: array<st>;

@compute @workgroup_size(WG)
fn modulate(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
            @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(wid, lid, nwg);
    if (i >= p.n) { return; }
    let j = b_index(p.base + i);
    let scale = f32(b[j]);
    let shift = f32(c[j]);
    out[p.out_off + i] = st(f32(a[p.a_off + i]) * (1.0 + scale) + shift);
}

@compute @workgroup_size(WG)
fn gated_add(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
             @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(wid, lid, nwg);
    if (i >= p.n) { return; }
    let gate = f32(b[b_index(p.base + i)]);
    out[p.out_off + i] = st(f32(a[p.a_off + i]) + f32(c[p.b_off + i]) * gate);
}
