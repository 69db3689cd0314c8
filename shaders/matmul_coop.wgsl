// Batched matrix multiply on tensor cores (wgpu's experimental cooperative
// matrices, VK_KHR_cooperative_matrix), f16 operands, f32 accumulation:
//   out[z, i, j] = ACT(alpha * sum_k a[z, i, k] * b[z, k, j] + bias[j]) * scale
//                  + residual_scale * residual[z, i, j]
// Same bindings, parameters and windowing as matmul_tiled in matmul.wgsl
// (ops/matmul.rs fills one Params for both, only the tile differs), so either
// kernel serves any window of the product.
//
//   @binding(0) p     Params (uniform): the fields below, laid out as matmul.wgsl's
//   @binding(1) a     array<f16> (read): item z at a_off + z * a_bstride, (i, k) at + i * lda + k
//   @binding(2) b     array<f16> (read): item z at b_off + z * b_bstride;
//                     TRANS_B = 0: (k, j) at + k * ldb + j; TRANS_B = 1: (k, j) at + j * ldb + k
//   @binding(3) bias  array<f16> (read): bias[bias_off + j], read only when has_bias = 1
//   @binding(4) out   array<f16> (read_write): (z, i, j) at out_off + z * o_bstride + i * ldo + j
//   @binding(19) residual array<f16> (read): out[o]'s residual at res_off + o - out_off, read
//                     only when has_residual = 1
//
// A workgroup computes a 128 x 128 tile of the output with 8 subgroups of 32
// invocations (the only subgroup size ops/matmul_coop.rs routes here), each
// owning a 32 x 64 block as 2 x 4 cooperative 16 x 16 accumulators (larger
// tiles than matmul_tiled's: half the staging per product). Operands
// are staged through workgroup memory in steps of 32 along K, so any sizes
// and offsets work: the cooperative loads only ever read workgroup memory.
// Steps inside K are read in straight-line code, the next one into
// registers while this one is multiplied (on an H200 5x faster than looped
// staging, which the driver did not unroll: docs/PERFORMANCE.md); rows and
// columns past M and N repeat the last one there, since their outputs are
// dropped. The last, partial step of K is staged zero-padded with bounds
// checks. With CONV = 1 the same kernel is a convolution, b gathered from
// the input image (implicit GEMM, see CONV). The accumulators go back through workgroup
// memory too, where the epilogue (alpha, the partial sums of earlier K
// windows, bias, activation, scale, residual) is applied per element with bounds checks.
//
// The wording of the extension (naga 30): `coopLoadT` / `coopStoreT` are
// row-major (`coopLoad` / `coopStore` column-major), the stride is in
// elements, and coopMultiplyAdd(a, b, c) = a * b + c.

enable f16;
enable wgpu_cooperative_matrix;

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
    b_bstride: u32,     // 0: one b shared by every batch item
    o_bstride: u32,
    lda: u32,
    ldb: u32,
    ldo: u32,
    alpha: f32,
    has_bias: u32,
    accumulate: u32,    // 1: add the partial sums of earlier windows of K (in `out`)
    finish: u32,        // 1: last window of K: add the bias, apply the activation
    // Fields that matmul.wgsl's gemm_packed reads; here (CONV = 1 only) the
    // convolution's geometry (ops/matmul_coop.rs, ConvParams).
    cv_h: u32,          // input height and width
    cv_w: u32,
    cv_taps: u32,       // kh * kw
    cv_kw: u32,
    cv_stride: u32,
    cv_pad_l: u32,
    cv_pad_t: u32,
    cv_wo: u32,         // output width
    cv_oy0: u32,        // first output row of the window
    res_off: u32,       // element offset in `residual` of out[out_off]
    has_residual: u32,
    scale: f32,
    residual_scale: f32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f16>;
@group(0) @binding(2) var<storage, read> b: array<f16>;
@group(0) @binding(3) var<storage, read> bias: array<f16>;
@group(0) @binding(19) var<storage, read> residual: array<f16>;
@group(0) @binding(4) var<storage, read_write> out: array<f16>;

// 1: b is [N, K] (nn.Linear's weight layout).
override TRANS_B: u32 = 0u;
// 1: tiles inside the product are fetched ahead without bounds checks (0:
// every tile through the checked loops; kept to compare,
// MOTIF_COOP_STAGING=checked).
override FAST_STAGING: u32 = 1u;
// Fused activation: 0 none, 1 SiLU, 2 GELU (erf), 3 GELU (tanh), 4 quick-GELU.
override ACT: u32 = 0u;
// 1: an NCHW convolution as an implicit product (ops/conv2d.rs's windows):
// a = the weight [Cout, Cin * kh * kw] (M = output channels, K = taps),
// b[k, j] = the input value that tap k of output pixel j reads (zero in
// the padding; N = output pixels of the window's rows, j = (oy - cv_oy0) *
// cv_wo + ox), z = batch item; the bias is per row. Needs TRANS_B = 0.
override CONV: u32 = 0u;

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

// Output tile of a workgroup, K step of the staging, one subgroup.
const TILE_M: u32 = 128u;
const TILE_N: u32 = 128u;
const TILE_K: u32 = 32u;
const SUBGROUP: u32 = 32u;
const INVOCATIONS: u32 = 256u;
const FRAG: u32 = 16u;
// Row strides of the staged tiles, padded by 8 halves (16 bytes, which keeps
// every fragment's start 16-byte aligned) so that rows start in different banks.
const A_LD: u32 = TILE_K + 8u;
const B_LD: u32 = TILE_N + 8u;

var<workgroup> a_tile: array<f16, 5120>;       // TILE_M x A_LD, row-major
var<workgroup> b_tile: array<f16, 4352>;       // TILE_K x B_LD, row-major
var<workgroup> c_frag: array<f32, 2048>;       // one 16 x 16 fragment per subgroup

fn load_a(z: u32, i: u32, kk: u32) -> f16 {
    if (i >= p.m || kk >= p.k) {
        return f16(0.0);
    }
    return a[p.a_off + z * p.a_bstride + i * p.lda + kk];
}

// CONV = 1: the input value that reduction index kk of output pixel
// (oy, ox) reads, zero in the padding. Offsets wrap like ops/conv2d.rs's.
fn conv_tap(z: u32, kk: u32, oy: u32, ox: u32) -> f16 {
    let ci = kk / p.cv_taps;
    let t = kk - ci * p.cv_taps;
    let ky = t / p.cv_kw;
    let kx = t - ky * p.cv_kw;
    let iy = oy * p.cv_stride + ky;
    let ix = ox * p.cv_stride + kx;
    // Unsigned: a row or column left of the padding wraps past the input.
    let y = iy - p.cv_pad_t;
    let x = ix - p.cv_pad_l;
    if (iy < p.cv_pad_t || ix < p.cv_pad_l || y >= p.cv_h || x >= p.cv_w) {
        return f16(0.0);
    }
    return b[p.b_off + z * p.b_bstride + (ci * p.cv_h + y) * p.cv_w + x];
}

fn load_b(z: u32, kk: u32, j: u32) -> f16 {
    if (j >= p.n || kk >= p.k) {
        return f16(0.0);
    }
    if (CONV == 1u) {
        return conv_tap(z, kk, p.cv_oy0 + j / p.cv_wo, j % p.cv_wo);
    }
    if (TRANS_B == 1u) {
        return b[p.b_off + z * p.b_bstride + j * p.ldb + kk];
    }
    return b[p.b_off + z * p.b_bstride + kk * p.ldb + j];
}

// Rows of a (and of a transposed b) between one invocation's values in a
// tile: 256 invocations cover 8 rows of 32 values of K at a time.
const ROW_STEP: u32 = INVOCATIONS / TILE_K;

// Where one invocation's values of an operand come from, besides K (see the
// main loop): `base` the element offset of its first row (a) or column (b)
// with K = 0, `first` that row or column (a, transposed b) or its row offset
// along K (plain b, convolution), `oy`/`ox` its output pixel (convolution).
struct Share {
    base: u32,
    first: u32,
    oy: u32,
    ox: u32,
}

// Values 4q .. 4q+3 of an invocation's share of a tile of a that lies inside
// K: rows first + ROW_STEP * (4q .. 4q+3) at K offset kn. Rows past M read
// the last row instead (their outputs are never stored), so the tiles at
// the edge of M take this path too.
fn fetch_a(sh: Share, kn: u32, q: u32) -> vec4<f16> {
    let last = p.m - 1u;
    let r = sh.first + 4u * q * ROW_STEP;
    let g = sh.base + kn;
    return vec4<f16>(
        a[g + min(r, last) * p.lda],
        a[g + min(r + ROW_STEP, last) * p.lda],
        a[g + min(r + 2u * ROW_STEP, last) * p.lda],
        a[g + min(r + 3u * ROW_STEP, last) * p.lda],
    );
}

// CONV = 1: where one invocation's next value of the implicit b comes
// from: input channel, kernel row and column of reduction index k.
struct Tap {
    ci: u32,
    ky: u32,
    kx: u32,
}

fn decode_tap(k: u32) -> Tap {
    let ci = k / p.cv_taps;
    let t = k - ci * p.cv_taps;
    let ky = t / p.cv_kw;
    return Tap(ci, ky, t - ky * p.cv_kw);
}

// The value at *tap for output pixel (oy, ox) of item z (zero in the
// padding), then *tap moves on by 2 along K (the invocation's next row of
// the tile): compares, not the two divisions of decode_tap, which cost more
// than the tile's tensor-core work.
fn next_tap(tap: ptr<function, Tap>, z: u32, oy: u32, ox: u32) -> f16 {
    let iy = oy * p.cv_stride + (*tap).ky;
    let ix = ox * p.cv_stride + (*tap).kx;
    let y = iy - p.cv_pad_t;
    let x = ix - p.cv_pad_l;
    var v = f16(0.0);
    if (iy >= p.cv_pad_t && ix >= p.cv_pad_l && y < p.cv_h && x < p.cv_w) {
        v = b[p.b_off + z * p.b_bstride + ((*tap).ci * p.cv_h + y) * p.cv_w + x];
    }
    // At most two carries each: kw >= 1 and kh >= 1.
    let kh = p.cv_taps / p.cv_kw;
    (*tap).kx += 2u;
    if ((*tap).kx >= p.cv_kw) {
        (*tap).kx -= p.cv_kw;
        (*tap).ky += 1u;
    }
    if ((*tap).kx >= p.cv_kw) {
        (*tap).kx -= p.cv_kw;
        (*tap).ky += 1u;
    }
    if ((*tap).ky >= kh) {
        (*tap).ky -= kh;
        (*tap).ci += 1u;
    }
    if ((*tap).ky >= kh) {
        (*tap).ky -= kh;
        (*tap).ci += 1u;
    }
    return v;
}

// Four consecutive values of the implicit b (rows 2 apart), from *tap on.
fn next_taps(tap: ptr<function, Tap>, z: u32, sh: Share) -> vec4<f16> {
    let v0 = next_tap(tap, z, sh.oy, sh.ox);
    let v1 = next_tap(tap, z, sh.oy, sh.ox);
    let v2 = next_tap(tap, z, sh.oy, sh.ox);
    let v3 = next_tap(tap, z, sh.oy, sh.ox);
    return vec4<f16>(v0, v1, v2, v3);
}

// The same as fetch_a for b (not a convolution, whose values come from
// next_taps). Columns past N were clamped in the Share (plain b) or are
// clamped here (transposed b).
fn fetch_b(z: u32, sh: Share, kn: u32, q: u32) -> vec4<f16> {
    if (TRANS_B == 1u) {
        let last = p.n - 1u;
        let r = sh.first + 4u * q * ROW_STEP;
        let g = sh.base + kn;
        return vec4<f16>(
            b[g + min(r, last) * p.ldb],
            b[g + min(r + ROW_STEP, last) * p.ldb],
            b[g + min(r + 2u * ROW_STEP, last) * p.ldb],
            b[g + min(r + 3u * ROW_STEP, last) * p.ldb],
        );
    }
    let g = sh.base + (kn + 8u * q) * p.ldb;
    let gs = 2u * p.ldb;
    return vec4<f16>(b[g], b[g + gs], b[g + 2u * gs], b[g + 3u * gs]);
}

fn put_a(v: vec4<f16>, s0: u32, ss: u32, q: u32) {
    let s = s0 + 4u * q * ss;
    a_tile[s] = v.x;
    a_tile[s + ss] = v.y;
    a_tile[s + 2u * ss] = v.z;
    a_tile[s + 3u * ss] = v.w;
}

fn put_b(v: vec4<f16>, s0: u32, ss: u32, q: u32) {
    let s = s0 + 4u * q * ss;
    b_tile[s] = v.x;
    b_tile[s + ss] = v.y;
    b_tile[s + 2u * ss] = v.z;
    b_tile[s + 3u * ss] = v.w;
}

// Stages the tile at k0 with bounds checks: zeros past M, N and K.
fn stage_checked(z: u32, i0: u32, j0: u32, k0: u32, lid: u32) {
    for (var e = lid; e < TILE_M * TILE_K; e += INVOCATIONS) {
        let r = e / TILE_K;
        let c = e % TILE_K;
        a_tile[r * A_LD + c] = load_a(z, i0 + r, k0 + c);
    }
    for (var e = lid; e < TILE_K * TILE_N; e += INVOCATIONS) {
        var kk: u32;
        var j: u32;
        if (TRANS_B == 1u) {
            kk = e % TILE_K;
            j = e / TILE_K;
        } else {
            kk = e / TILE_N;
            j = e % TILE_N;
        }
        b_tile[kk * B_LD + j] = load_b(z, k0 + kk, j0 + j);
    }
}

// Writes one accumulator fragment whose (0, 0) is output (i0, j0) through
// the epilogue. Called by every subgroup in the same order (the barriers).
fn store_fragment(frag: coop_mat16x16<f32, C>, sg: u32, lane: u32, z: u32, i0: u32, j0: u32) {
    let base = sg * FRAG * FRAG;
    coopStoreT(frag, &c_frag[base], FRAG);
    workgroupBarrier();
    for (var e = lane; e < FRAG * FRAG; e += SUBGROUP) {
        let i = i0 + e / FRAG;
        let j = j0 + e % FRAG;
        if (i < p.m && j < p.n) {
            let o = p.out_off + z * p.o_bstride + i * p.ldo + j;
            var v = p.alpha * c_frag[base + e];
            if (p.accumulate == 1u) {
                v += f32(out[o]);
            }
            if (p.finish == 1u) {
                if (p.has_bias == 1u) {
                    v += f32(bias[p.bias_off + select(j, i, CONV == 1u)]);
                }
                v = activate(v) * p.scale;
                if (p.has_residual == 1u) {
                    v += p.residual_scale * f32(residual[p.res_off + o - p.out_off]);
                }
            }
            out[o] = f16(v);
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(256)
fn matmul_coop(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let z = wid.z;
    let i0 = wid.y * TILE_M;
    let j0 = wid.x * TILE_N;
    // Subgroups of a 1-D workgroup are consecutive invocations.
    let sg = lid / SUBGROUP;
    let lane = lid % SUBGROUP;
    let sm = (sg / 2u) * 32u;
    let sn = (sg % 2u) * 64u;

    // The accumulators start as zeros loaded from workgroup memory: loads
    // and stores are the operations every implementation of the extension
    // has, where a zero constant of a cooperative type is less certain.
    for (var e = lid; e < 8u * FRAG * FRAG; e += INVOCATIONS) {
        c_frag[e] = 0.0;
    }
    workgroupBarrier();
    var acc00 = coopLoadT<coop_mat16x16<f32, C>>(&c_frag[sg * FRAG * FRAG], FRAG);
    var acc01 = acc00;
    var acc02 = acc00;
    var acc03 = acc00;
    var acc10 = acc00;
    var acc11 = acc00;
    var acc12 = acc00;
    var acc13 = acc00;
    workgroupBarrier();

    // Where each invocation's 16 values of a and of b come from (Share) and
    // go to in the staged tiles: value q at s0 + q * ss.
    let a_sh = Share(p.a_off + z * p.a_bstride + lid % TILE_K, i0 + lid / TILE_K, 0u, 0u);
    let a_s0 = (lid / TILE_K) * A_LD + lid % TILE_K;
    let a_ss = ROW_STEP * A_LD;
    var b_sh: Share;
    var b_s0: u32;
    var b_ss: u32;
    if (TRANS_B == 1u) {
        b_sh = Share(p.b_off + z * p.b_bstride + lid % TILE_K, j0 + lid / TILE_K, 0u, 0u);
        b_s0 = (lid % TILE_K) * B_LD + lid / TILE_K;
        b_ss = ROW_STEP;
    } else {
        // One column per invocation, clamped to the last: a column past N
        // only feeds outputs that are never stored.
        let j = min(j0 + lid % TILE_N, p.n - 1u);
        let row = lid / TILE_N;
        b_sh = Share(
            p.b_off + z * p.b_bstride + row * p.ldb + j,
            row,
            p.cv_oy0 + j / max(p.cv_wo, 1u),
            j % max(p.cv_wo, 1u),
        );
        b_s0 = row * B_LD + lid % TILE_N;
        b_ss = (INVOCATIONS / TILE_N) * B_LD;
    }

    // The next tile's values wait in registers while this one is
    // multiplied. Every tile inside K takes the unchecked path; the last,
    // partial one of K is staged with bounds checks.
    var pa0: vec4<f16>;
    var pa1: vec4<f16>;
    var pa2: vec4<f16>;
    var pa3: vec4<f16>;
    var pb0: vec4<f16>;
    var pb1: vec4<f16>;
    var pb2: vec4<f16>;
    var pb3: vec4<f16>;
    if (p.k > 0u) {
        if (FAST_STAGING == 1u && TILE_K <= p.k) {
            put_a(fetch_a(a_sh, 0u, 0u), a_s0, a_ss, 0u);
            put_a(fetch_a(a_sh, 0u, 1u), a_s0, a_ss, 1u);
            put_a(fetch_a(a_sh, 0u, 2u), a_s0, a_ss, 2u);
            put_a(fetch_a(a_sh, 0u, 3u), a_s0, a_ss, 3u);
            if (CONV == 1u) {
                // Rows first + 2 * (0 .. 15) of the implicit b, in order.
                var tap = decode_tap(b_sh.first);
                put_b(next_taps(&tap, z, b_sh), b_s0, b_ss, 0u);
                put_b(next_taps(&tap, z, b_sh), b_s0, b_ss, 1u);
                put_b(next_taps(&tap, z, b_sh), b_s0, b_ss, 2u);
                put_b(next_taps(&tap, z, b_sh), b_s0, b_ss, 3u);
            } else {
                put_b(fetch_b(z, b_sh, 0u, 0u), b_s0, b_ss, 0u);
                put_b(fetch_b(z, b_sh, 0u, 1u), b_s0, b_ss, 1u);
                put_b(fetch_b(z, b_sh, 0u, 2u), b_s0, b_ss, 2u);
                put_b(fetch_b(z, b_sh, 0u, 3u), b_s0, b_ss, 3u);
            }
        } else {
            stage_checked(z, i0, j0, 0u, lid);
        }
    }
    for (var k0 = 0u; k0 < p.k; k0 += TILE_K) {
        workgroupBarrier();
        let kn = k0 + TILE_K;
        let fast_next = FAST_STAGING == 1u && kn + TILE_K <= p.k;
        if (fast_next) {
            pa0 = fetch_a(a_sh, kn, 0u);
            pa1 = fetch_a(a_sh, kn, 1u);
            pa2 = fetch_a(a_sh, kn, 2u);
            pa3 = fetch_a(a_sh, kn, 3u);
            if (CONV == 1u) {
                var tap = decode_tap(kn + b_sh.first);
                pb0 = next_taps(&tap, z, b_sh);
                pb1 = next_taps(&tap, z, b_sh);
                pb2 = next_taps(&tap, z, b_sh);
                pb3 = next_taps(&tap, z, b_sh);
            } else {
                pb0 = fetch_b(z, b_sh, kn, 0u);
                pb1 = fetch_b(z, b_sh, kn, 1u);
                pb2 = fetch_b(z, b_sh, kn, 2u);
                pb3 = fetch_b(z, b_sh, kn, 3u);
            }
        }
        for (var kk = 0u; kk < TILE_K; kk += FRAG) {
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&a_tile[sm * A_LD + kk], A_LD);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&a_tile[(sm + FRAG) * A_LD + kk], A_LD);
            let b0 = coopLoadT<coop_mat16x16<f16, B>>(&b_tile[kk * B_LD + sn], B_LD);
            let b1 = coopLoadT<coop_mat16x16<f16, B>>(&b_tile[kk * B_LD + sn + FRAG], B_LD);
            let b2 = coopLoadT<coop_mat16x16<f16, B>>(&b_tile[kk * B_LD + sn + 2u * FRAG], B_LD);
            let b3 = coopLoadT<coop_mat16x16<f16, B>>(&b_tile[kk * B_LD + sn + 3u * FRAG], B_LD);
            acc00 = coopMultiplyAdd(a0, b0, acc00);
            acc01 = coopMultiplyAdd(a0, b1, acc01);
            acc02 = coopMultiplyAdd(a0, b2, acc02);
            acc03 = coopMultiplyAdd(a0, b3, acc03);
            acc10 = coopMultiplyAdd(a1, b0, acc10);
            acc11 = coopMultiplyAdd(a1, b1, acc11);
            acc12 = coopMultiplyAdd(a1, b2, acc12);
            acc13 = coopMultiplyAdd(a1, b3, acc13);
        }
        workgroupBarrier();
        if (fast_next) {
            put_a(pa0, a_s0, a_ss, 0u);
            put_a(pa1, a_s0, a_ss, 1u);
            put_a(pa2, a_s0, a_ss, 2u);
            put_a(pa3, a_s0, a_ss, 3u);
            put_b(pb0, b_s0, b_ss, 0u);
            put_b(pb1, b_s0, b_ss, 1u);
            put_b(pb2, b_s0, b_ss, 2u);
            put_b(pb3, b_s0, b_ss, 3u);
        } else if (kn < p.k) {
            stage_checked(z, i0, j0, kn, lid);
        }
    }

    store_fragment(acc00, sg, lane, z, i0 + sm, j0 + sn);
    store_fragment(acc01, sg, lane, z, i0 + sm, j0 + sn + FRAG);
    store_fragment(acc02, sg, lane, z, i0 + sm, j0 + sn + 2u * FRAG);
    store_fragment(acc03, sg, lane, z, i0 + sm, j0 + sn + 3u * FRAG);
    store_fragment(acc10, sg, lane, z, i0 + sm + FRAG, j0 + sn);
    store_fragment(acc11, sg, lane, z, i0 + sm + FRAG, j0 + sn + FRAG);
    store_fragment(acc12, sg, lane, z, i0 + sm + FRAG, j0 + sn + 2u * FRAG);
    store_fragment(acc13, sg, lane, z, i0 + sm + FRAG, j0 + sn + 3u * FRAG);
}
