// 2-D convolution (cross-correlation, as PyTorch's nn.Conv2d) with bias and
// a fused activation, NCHW:
//   out[z, co, oy, ox] = ACT(bias[co] + sum_{ci, ky, kx} w[co, ci, ky, kx] * x[z, ci, oy*s + ky - pad_t, ox*s + kx - pad_l]) * scale
//                        + residual_scale * residual[z, co, oy, ox]
// (the residual: a resnet's shortcut, read here instead of by a separate add).
// Taps outside the input are zero (padding). As an implicit matrix product:
// rows are output channels, columns output pixels, and K runs over the taps
// (ci, ky, kx). Two ways to compute it, picked in ops/conv2d.rs:
//   conv2d_tiled   GPUs: workgroup-memory tiles of weights and input taps.
//   pack_taps,     CPU adapters: write the input taps of a band of output rows
//   pack_weights   and the weights as the packed operands of matmul.wgsl's
//                  gemm_packed (see there why), which multiplies them.
//
// conv2d_tiled:
// Bindings (element indices inside each binding):
//   @binding(0) p     uniform Params
//   @binding(1) x     array<st> (read): x[z, ci, iy, ix] at x_off + z * x_bstride + ci * h * w + iy * w + ix
//   @binding(2) wt    array<wst> (read): w[co, ci, ky, kx] at w_off + co * w_stride + (ci * kh + ky) * kw + kx
//   @binding(3) bias  array<st> (read): bias[bias_off + co], read only when has_bias = 1
//   @binding(4) out   array<st> (read_write): out[z, co, oy, ox] at out_off + z * o_bstride + co * ho * wo + oy * wo + ox
//   @binding(19) residual array<st> (read): out[o]'s residual at res_off + o - out_off, read only
//                     when has_residual = 1
// A convolution too large for one binding runs in windows: of batch items,
// of output channels (co counts from the window's first channel), of output
// rows (oy0 .. oy0 + rows; x_off and out_off then hold the window's offset
// minus its first row, with u32 wrap-around), and of input channels, whose
// partial sums are added up in `out` (`accumulate` = 1) until the last chunk
// (`finish` = 1) adds the bias, applies the activation, the scale and the
// residual.
//
// The weights' storage type `wst` is `st` or f32: ops/conv2d.rs prepends its
// alias. f32 weights against f16 activations serve models whose f16-rounded
// weights alone cost more accuracy than the f16 budget allows (the Wan VAE);
// every product is f32 either way.

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
    res_off: u32,       // out_off's counterpart in `residual` (same wrap-around)
    has_residual: u32,
    scale: f32,
    residual_scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<st>;
@group(0) @binding(2) var<storage, read> wt: array<wst>;
@group(0) @binding(3) var<storage, read> bias: array<st>;
@group(0) @binding(4) var<storage, read_write> out: array<st>;
@group(0) @binding(19) var<storage, read> residual: array<st>;

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
        v = activate(v) * p.scale;
        if (p.has_residual == 1u) {
            v += p.residual_scale * f32(residual[p.res_off + o - p.out_off]);
        }
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
// One column of padding: stores that walk K then hit different banks.
var<workgroup> w_tile: array<array<f32, TILE + 1u>, TILE_K>;
var<workgroup> x_tile: array<array<f32, TILE + 1u>, TILE_K>;

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
// The CPU-adapter path: the product of packed weights and packed input taps
// by matmul.wgsl's gemm_packed (see there why). Rows are output channels,
// columns the output pixels of a band of rows of one batch item, and K runs
// over (tap, input channel) — tap t = ky * KW + kx outer — so that an f16
// word holds two channels of one tap: cw = ceil(cin / 2) words per tap (f32:
// cw = cin). Both operands use the packed layout of matmul.wgsl.

const BLOCK_WORDS: u32 = 16384u;

// Kernel size and stride as constants: splitting indices by them compiles to
// multiplications, while a division by a runtime value is eight scalar
// divisions per SIMD group on a CPU adapter.
override KH: u32 = 3u;
override KW: u32 = 3u;
override STRIDE: u32 = 1u;
// 1: words hold two f16 values (st = f16), low half first. f32 weights
// (wst = f32) pack both operands as f32 words, f16 input taps too: the
// product of matmul.wgsl takes one packing for both.
override PACKED_F16: bool = false;

struct PackParams {
    cin: u32,
    h: u32,
    w: u32,
    wo: u32,
    rows: u32,       // output rows in the band
    oy0: u32,        // first output row of the band
    pad_l: u32,
    pad_t: u32,
    x_off: u32,      // the item's first element in x
    cw: u32,         // words per tap
    row_words: u32,  // words per block row (a power of two)
    rb: u32,         // block rows (a power of two)
    words_shift: u32,
    rb_shift: u32,
    n_kc: u32,       // K chunks
    row0: u32,       // pack_weights: first output channel of the dispatch;
                     // pack_taps: packed row of the band's first pixel (items side by side)
    dst_base: u32,   // pack_weights: word index (in the packed operand) of packed[0]
    padded_w: u32,   // pack_taps4: columns of the padded input the band reads
    x_item: u32,     // pack_taps4: elements of x between the items of its z
}

// pack_taps and pack_weights bindings:
//   @binding(0) pp      uniform PackParams
//   @binding(1) x       as above (pack_taps)
//   @binding(2) wt      as above (pack_weights)
//   @binding(5) packed  array<u32> (read_write): the blocks
@group(0) @binding(0) var<uniform> pp: PackParams;
@group(0) @binding(5) var<storage, read_write> packed: array<u32>;

fn packed_index(row: u32, word: u32) -> u32 {
    return ((row >> pp.rb_shift) * pp.n_kc + (word >> pp.words_shift)) * BLOCK_WORDS
        + (row & (pp.rb - 1u)) * pp.row_words + (word & (pp.row_words - 1u));
}

// pack_taps4: the offset in x of this invocation's item (z) from x_off.
var<private> item_off: u32 = 0u;

fn input_value(ci: u32, iy: u32, ix: u32) -> f32 {
    // The clamped load runs unconditionally (no branch around a lane loop).
    let ok = ci < pp.cin && iy < pp.h && ix < pp.w;
    let v = f32(x[pp.x_off + item_off + select(0u, (ci * pp.h + iy) * pp.w + ix, ok)]);
    return select(0.0, v, ok);
}

// One invocation per word of input channels at one position of the padded
// input (zeros outside it) that the band reads, written to every tap that
// reads it: each input value is loaded once instead of KH * KW times, and
// every tap of the band is written exactly once. Words of K past the last
// tap are never written (a new packed buffer is zero).
// x: channel word, y: padded input column, z: padded input row of the band.
@compute @workgroup_size(32)
fn pack_taps(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c2 = gid.x;
    if (c2 >= pp.cw) {
        return;
    }
    let px = gid.y;
    let py = gid.z;
    // u32 wrap-around makes positions above or left of the input huge.
    let iy = pp.oy0 * STRIDE + py - pp.pad_t;
    let ix = px - pp.pad_l;
    var v: u32;
    if (PACKED_F16) {
        v = pack2x16float(vec2(input_value(2u * c2, iy, ix), input_value(2u * c2 + 1u, iy, ix)));
    } else {
        v = bitcast<u32>(input_value(c2, iy, ix));
    }
    for (var ky = 0u; ky < KH; ky++) {
        for (var kx = 0u; kx < KW; kx++) {
            let dy = py - ky;
            let dx = px - kx;
            let oy = dy / STRIDE;
            let ox = dx / STRIDE;
            if (py >= ky && px >= kx && dy == oy * STRIDE && dx == ox * STRIDE && oy < pp.rows && ox < pp.wo) {
                packed[packed_index(pp.row0 + oy * pp.wo + ox, (ky * KW + kx) * pp.cw + c2)] = v;
            }
        }
    }
}

// pack_taps4: the same, 4 words of channels per invocation, written with
// one vec4 store per tap (stores too are loops over the lanes on a CPU
// adapter). Needs cw to be a multiple of 4. A workgroup spans (padded
// column, channel vector) pairs, channels fastest: with x over channels
// alone, few channels (the VAE's 32 at full resolution: 8 vectors) left most
// of its 32 lanes idle.
// x: column * cw / 4 + channel vector, y: padded input row of the band,
// z: item of the group (x_item elements of x apart, rows * wo packed rows
// apart), so that one dispatch packs the band of every item.
//   @binding(6) packed4  the blocks as array<vec4<u32>>
@group(0) @binding(6) var<storage, read_write> packed4: array<vec4<u32>>;

fn input_word(c2: u32, iy: u32, ix: u32) -> u32 {
    if (PACKED_F16) {
        return pack2x16float(vec2(input_value(2u * c2, iy, ix), input_value(2u * c2 + 1u, iy, ix)));
    }
    return bitcast<u32>(input_value(c2, iy, ix));
}

@compute @workgroup_size(32)
fn pack_taps4(@builtin(global_invocation_id) gid: vec3<u32>) {
    let vectors = pp.cw / 4u;
    let px = gid.x / vectors;
    if (px >= pp.padded_w) {
        return;
    }
    let c2 = 4u * (gid.x - px * vectors);
    let py = gid.y;
    item_off = gid.z * pp.x_item;
    let row0 = pp.row0 + gid.z * pp.rows * pp.wo;
    let iy = pp.oy0 * STRIDE + py - pp.pad_t;
    let ix = px - pp.pad_l;
    let v = vec4(input_word(c2, iy, ix), input_word(c2 + 1u, iy, ix),
                 input_word(c2 + 2u, iy, ix), input_word(c2 + 3u, iy, ix));
    for (var ky = 0u; ky < KH; ky++) {
        for (var kx = 0u; kx < KW; kx++) {
            let dy = py - ky;
            let dx = px - kx;
            let oy = dy / STRIDE;
            let ox = dx / STRIDE;
            if (py >= ky && px >= kx && dy == oy * STRIDE && dx == ox * STRIDE && oy < pp.rows && ox < pp.wo) {
                packed4[packed_index(row0 + oy * pp.wo + ox, (ky * KW + kx) * pp.cw + c2) / 4u] = v;
            }
        }
    }
}

fn weight_value(co: u32, ci: u32, t: u32) -> f32 {
    if (ci >= pp.cin) {
        return 0.0;
    }
    return f32(wt[(co * pp.cin + ci) * (KH * KW) + t]);
}

// The weights [cout, cin, KH, KW] as the row operand, K in (tap, channel) order.
// x: channel word, y: tap, z: output channel from row0.
@compute @workgroup_size(32)
fn pack_weights(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c2 = gid.x;
    if (c2 >= pp.cw) {
        return;
    }
    let t = gid.y;
    let co = pp.row0 + gid.z;
    var v: u32;
    if (PACKED_F16) {
        v = pack2x16float(vec2(weight_value(co, 2u * c2, t), weight_value(co, 2u * c2 + 1u, t)));
    } else {
        v = bitcast<u32>(weight_value(co, c2, t));
    }
    packed[packed_index(co, t * pp.cw + c2) - pp.dst_base] = v;
}
