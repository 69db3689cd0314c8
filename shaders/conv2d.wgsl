// 2-D convolution (cross-correlation, as PyTorch's nn.Conv2d) with bias and
// a fused activation, NCHW:
//   out[z, co, oy, ox] = ACT(bias[co] + sum_{ci, ky, kx} w[co, ci, ky, kx] * x[z, ci, oy*s + ky - pad_t, ox*s + kx - pad_l])
// Taps outside the input are zero (padding).
//
// Bindings (element indices inside each binding):
//   @binding(0) p     uniform Params
//   @binding(1) x     array<st> (read): x[z, ci, iy, ix] at x_off + z * x_bstride + ci * h * w + iy * w + ix
//   @binding(2) wt    array<st> (read): w[co, ci, ky, kx] at w_off + co * w_stride + (ci * kh + ky) * kw + kx
//   @binding(3) bias  array<st> (read): bias[bias_off + co], read only when has_bias = 1
//   @binding(4) out   array<st> (read_write): out[z, co, oy, ox] at out_off + z * o_bstride + co * ho * wo + oy * wo + ox
// A convolution too large for one binding runs in windows: of batch items,
// of output channels (co counts from the window's first channel), of output
// rows (oy0 .. oy0 + rows; x_off and out_off then hold the window's offset
// minus its first row, with u32 wrap-around), and of input channels, whose
// partial sums are added up in `out` (`accumulate` = 1) until the last chunk
// (`finish` = 1) adds the bias and applies the activation.

struct Params {
    batch: u32,
    cin: u32,
    h: u32,
    w: u32,
    cout: u32,
    ho: u32,
    wo: u32,
    kh: u32,
    kw: u32,
    stride: u32,
    pad_l: u32,
    pad_t: u32,
    oy0: u32,
    rows: u32,
    x_off: u32,
    w_off: u32,
    bias_off: u32,
    out_off: u32,
    x_bstride: u32,
    o_bstride: u32,
    w_stride: u32,
    has_bias: u32,
    accumulate: u32,
    finish: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<st>;
@group(0) @binding(2) var<storage, read> wt: array<st>;
@group(0) @binding(3) var<storage, read> bias: array<st>;
@group(0) @binding(4) var<storage, read_write> out: array<st>;

// Fused activation: 0 none, 1 SiLU, 2 GELU (erf), 3 GELU (tanh), 4 quick-GELU.
override ACT: u32 = 0u;

fn sigmoid(v: f32) -> f32 {
    return 1.0 / (1.0 + exp(-v));
}

// erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7): WGSL has no erf.
fn erf_approx(v: f32) -> f32 {
    let z = abs(v);
    let t = 1.0 / (1.0 + 0.3275911 * z);
    let poly = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t;
    return sign(v) * (1.0 - poly * exp(-z * z));
}

fn activate(v: f32) -> f32 {
    switch ACT {
        case 1u: { return v * sigmoid(v); }
        case 2u: { return 0.5 * v * (1.0 + erf_approx(v * 0.7071067811865476)); }
        case 3u: {
            // tanh has saturated long before |u| = 10; the clamp keeps exp() finite on every driver.
            let u = clamp(0.7978845608028654 * (v + 0.044715 * v * v * v), -10.0, 10.0);
            return 0.5 * v * (1.0 + tanh(u));
        }
        case 4u: { return v * sigmoid(1.702 * v); }
        default: { return v; }
    }
}

// Writes one finished sum (the caller checks the indices).
fn store(z: u32, co: u32, oy: u32, ox: u32, sum: f32) {
    let o = p.out_off + z * p.o_bstride + co * p.ho * p.wo + oy * p.wo + ox;
    var v = sum;
    if (p.accumulate == 1u) {
        v += f32(out[o]);
    }
    if (p.finish == 1u) {
        if (p.has_bias == 1u) {
            v += f32(bias[p.bias_off + co]);
        }
        v = activate(v);
    }
    out[o] = st(v);
}

// One output per invocation: the plain kernel every faster one is checked against.
// x: output pixel of the row window, y: output channel, z: batch item.
@compute @workgroup_size(64)
fn conv2d_naive(@builtin(global_invocation_id) gid: vec3<u32>) {
    let co = gid.y;
    let z = gid.z;
    if (gid.x >= p.rows * p.wo) {
        return;
    }
    let oy = p.oy0 + gid.x / p.wo;
    let ox = gid.x % p.wo;
    let x_item = p.x_off + z * p.x_bstride;
    let w_row = p.w_off + co * p.w_stride;
    var sum = 0.0;
    for (var ci = 0u; ci < p.cin; ci++) {
        for (var ky = 0u; ky < p.kh; ky++) {
            // u32 wrap-around makes taps above the input huge, so one test per axis covers both sides.
            let iy = oy * p.stride + ky - p.pad_t;
            if (iy >= p.h) {
                continue;
            }
            for (var kx = 0u; kx < p.kw; kx++) {
                let ix = ox * p.stride + kx - p.pad_l;
                if (ix >= p.w) {
                    continue;
                }
                let xv = f32(x[x_item + (ci * p.h + iy) * p.w + ix]);
                sum += xv * f32(wt[w_row + (ci * p.kh + ky) * p.kw + kx]);
            }
        }
    }
    store(z, co, oy, ox, sum);
}
