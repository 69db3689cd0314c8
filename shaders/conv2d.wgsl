// 2-D convolution (cross-correlation, as PyTorch's nn.Conv2d) with bias and
// a fused activation, NCHW:
//   out[z, co, oy, ox] = ACT(bias[co] + sum_{ci, ky, kx} w[co, ci, ky, kx] * x[z, ci, oy*s + ky - pad_t, ox*s + kx - pad_l])
// Taps outside the input are zero (padding). As an implicit matrix product:
// rows are output channels, columns output pixels, and K runs over (ci, ky, kx)
// in the weight's own order. Two ways to compute it, picked in ops/conv2d.rs:
//   conv2d_tiled   GPUs: workgroup-memory tiles of weights and input taps.
//   pack_im2col    CPU adapters: writes the taps of a band of output rows as
//                  the packed column operand of matmul.wgsl's gemm_packed
//                  (see there why), which multiplies them with the packed weights.
//
// conv2d_tiled:
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

// The input value at tap k = (ci, ky, kx) of output pixel q (counted from
// row oy0 of the window), or 0 in the padding.
fn tap(z: u32, k: u32, q: u32) -> f32 {
    let taps = p.kh * p.kw;
    let ci = k / taps;
    if (ci >= p.cin || q >= p.rows * p.wo) {
        return 0.0;
    }
    let t = k % taps;
    // u32 wrap-around makes taps above or left of the input huge, so one test per axis covers both sides.
    let iy = (p.oy0 + q / p.wo) * p.stride + t / p.kw - p.pad_t;
    let ix = (q % p.wo) * p.stride + t % p.kw - p.pad_l;
    if (iy >= p.h || ix >= p.w) {
        return 0.0;
    }
    return f32(x[p.x_off + z * p.x_bstride + (ci * p.h + iy) * p.w + ix]);
}

// A 64-channel x 64-pixel output tile per workgroup of 16 x 16 invocations,
// 4 x 4 outputs each, over K in steps of 16 staged in workgroup memory.
// x: pixel tiles of the row window, y: channel tiles, z: batch item.
const TILE: u32 = 64u;
const TILE_K: u32 = 16u;
var<workgroup> w_tile: array<array<f32, TILE>, TILE_K>;
var<workgroup> x_tile: array<array<f32, TILE>, TILE_K>;

@compute @workgroup_size(16, 16)
fn conv2d_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let z = wid.z;
    let co0 = wid.y * TILE;
    let q0 = wid.x * TILE;
    let t = lid.y * 16u + lid.x;
    let k_len = p.cin * p.kh * p.kw;
    var acc: array<array<f32, 4>, 4>;
    for (var k0 = 0u; k0 < k_len; k0 += TILE_K) {
        for (var s = 0u; s < 4u; s++) {
            let e = t + s * 256u;
            // Weights: consecutive invocations walk K, contiguous in a weight row.
            let wk = e % TILE_K;
            let wc = e / TILE_K;
            var wv = 0.0;
            if (co0 + wc < p.cout && k0 + wk < k_len) {
                wv = f32(wt[p.w_off + (co0 + wc) * p.w_stride + k0 + wk]);
            }
            w_tile[wk][wc] = wv;
            // Taps: consecutive invocations walk pixels.
            x_tile[e / TILE][e % TILE] = tap(z, k0 + e / TILE, q0 + e % TILE);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TILE_K; kk++) {
            var wv: array<f32, 4>;
            var xv: array<f32, 4>;
            for (var r = 0u; r < 4u; r++) {
                wv[r] = w_tile[kk][lid.y + 16u * r];
                xv[r] = x_tile[kk][lid.x + 16u * r];
            }
            for (var r = 0u; r < 4u; r++) {
                for (var c = 0u; c < 4u; c++) {
                    acc[r][c] = fma(wv[r], xv[c], acc[r][c]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < 4u; r++) {
        let co = co0 + lid.y + 16u * r;
        for (var c = 0u; c < 4u; c++) {
            let q = q0 + lid.x + 16u * c;
            if (co < p.cout && q < p.rows * p.wo) {
                store(z, co, p.oy0 + q / p.wo, q % p.wo, acc[r][c]);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// pack_im2col: the taps of output rows oy0 .. oy0 + rows of one batch item,
// written as matmul.wgsl's packed operand (one block row per output pixel,
// K along the row, f16 in pairs), for gemm_packed to multiply with the
// packed weights.
//   @binding(0) ip      uniform Im2colParams
//   @binding(1) x       as above (one item: x_off is its first element)
//   @binding(2) packed  array<u32> (read_write): the blocks
// Padding rows of the blocks (past the last pixel) are not written: they only
// feed output columns that are never stored. Words past K are written as 0.

const BLOCK_WORDS: u32 = 16384u;

struct Im2colParams {
    cin: u32,
    h: u32,
    w: u32,
    wo: u32,
    stride: u32,
    pad_l: u32,
    pad_t: u32,
    x_off: u32,
    oy0: u32,
    k: u32,          // cin * KH * KW
    row_words: u32,  // words per block row (a power of two)
    rb: u32,         // pixels per block (a power of two)
    words_shift: u32, // log2(row_words)
    rb_shift: u32,
    n_kc: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> ip: Im2colParams;
@group(0) @binding(2) var<storage, read_write> packed: array<u32>;

// Kernel size as constants, so that splitting K into (ci, ky, kx) compiles
// to multiplications: a division by a runtime value is eight scalar
// divisions per SIMD group on a CPU adapter.
override KH: u32 = 3u;
override KW: u32 = 3u;
// 1: words hold two f16 values (st = f16).
override PACKED_F16: bool = false;

fn im2col_tap(oy: u32, ox: u32, k: u32) -> f32 {
    if (k >= ip.k) {
        return 0.0;
    }
    let ci = k / (KH * KW);
    let t = k - ci * (KH * KW);
    let ky = t / KW;
    let iy = oy * ip.stride + ky - ip.pad_t;
    let ix = ox * ip.stride + (t - ky * KW) - ip.pad_l;
    if (iy >= ip.h || ix >= ip.w) {
        return 0.0;
    }
    return f32(x[ip.x_off + (ci * ip.h + iy) * ip.w + ix]);
}

// x: words along K (all chunks), y: output row of the band, z: output column.
@compute @workgroup_size(32)
fn pack_im2col(@builtin(global_invocation_id) gid: vec3<u32>) {
    let word = gid.x;
    let pixel = gid.y * ip.wo + gid.z;
    let oy = ip.oy0 + gid.y;
    let ox = gid.z;
    let at = ((pixel >> ip.rb_shift) * ip.n_kc + (word >> ip.words_shift)) * BLOCK_WORDS
        + (pixel & (ip.rb - 1u)) * ip.row_words + (word & (ip.row_words - 1u));
    var v: u32;
    if (PACKED_F16) {
        v = pack2x16float(vec2(im2col_tap(oy, ox, 2u * word), im2col_tap(oy, ox, 2u * word + 1u)));
    } else {
        v = bitcast<u32>(im2col_tap(oy, ox, word));
    }
    packed[at] = v;
}
