// Batched matrix multiply on tensor cores (wgpu's experimental cooperative
// matrices, VK_KHR_cooperative_matrix), f16 operands, f32 accumulation:
//   out[z, i, j] = ACT(alpha * sum_k a[z, i, k] * b[z, k, j] + bias[j]) * scale
//                  + residual_scale * residual[z, i, j]
// Same bindings, parameters and windowing as matmul_tiled in matmul.wgsl
// (ops/matmul.rs fills one Params for both, only the tile differs), so either
// kernel serves any window of the product.
//
// This file is a template: ops/matmul_coop.rs writes one shader per variant
// (workgroup tile, subgroups, fragments per subgroup, fragment shape, load
// width, staging buffers, and the product: plain b, transposed b or a
// convolution) by filling the `{{...}}` slots, and a portable twin of every
// variant whose fragments are plain f32 arithmetic instead of cooperative
// matrices (the same staging, tiling and epilogue, testable on any adapter).
//
//   @binding(0) p     Params (uniform): the fields below, laid out as matmul.wgsl's
//   @binding(1) a     the rows of a, f16, read as chunks of LOAD_A halves
//                     (f16, vec2<f16>, vec4<f16> or Half8): item z at a_off + z * a_bstride,
//                     (i, k) at + i * lda + k (in halves)
//   @binding(2) b     f16 in chunks of LOAD_B halves; item z at b_off + z * b_bstride;
//                     TRANS_B = 0: (k, j) at + k * ldb + j; TRANS_B = 1: (k, j) at + j * ldb + k;
//                     CONV = 1: the NCHW input the implicit product gathers from (LOAD_B = 1)
//   @binding(3) bias  array<f16> (read): bias[bias_off + j] (CONV: + i), read only when has_bias = 1
//   @binding(4) out   array<f16> (read_write): (z, i, j) at out_off + z * o_bstride + i * ldo + j
//   @binding(19) residual array<f16> (read): out[o]'s residual at res_off + o - out_off, read
//                     only when has_residual = 1
//
// A workgroup computes a TILE_M x TILE_N tile of the output with SG_M x SG_N
// subgroups, each owning FRAGS_M x FRAGS_N accumulator fragments of FRAG x
// FRAG. Operands are staged through workgroup memory in steps of TILE_K along
// K, rows padded by 8 halves (16 bytes: every fragment's start stays 16-byte
// aligned, and consecutive rows start in different banks); the cooperative
// loads only ever read workgroup memory, so any sizes and offsets work. The
// next step's chunks are read into registers while this step is multiplied
// (straight-line code: the driver did not unroll looped staging, which was
// 5x slower on an H200, docs/PERFORMANCE.md); with STAGES = 2 they go into
// the other staging buffer at once (one barrier per step), with STAGES = 1
// into the same one after a second barrier (less workgroup memory). Rows and
// columns past M and N repeat the last one there, since their outputs are
// dropped; values past K are zeros. With CONV = 1 the same kernel is a
// convolution, b gathered from the input image (implicit GEMM). The
// accumulators go back through workgroup memory too, one fragment per
// subgroup at a time, where the epilogue (alpha, the partial sums of earlier
// K windows, bias, activation, scale, residual) is applied per element with
// bounds checks.
//
// The wording of the extension (naga 30): `coopLoadT` / `coopStoreT` are
// row-major (`coopLoad` / `coopStore` column-major), the stride is in
// elements, and coopMultiplyAdd(a, b, c) = a * b + c.

{{HEADER}}

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
    // convolution's geometry (ops/conv2d.rs, ConvParams).
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
@group(0) @binding(1) var<storage, read> a: array<{{A_CHUNK}}>;
@group(0) @binding(2) var<storage, read> b: array<{{B_CHUNK}}>;
@group(0) @binding(3) var<storage, read> bias: array<f16>;
@group(0) @binding(19) var<storage, read> residual: array<f16>;
@group(0) @binding(4) var<storage, read_write> out: array<f16>;

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

// Row strides of the staged tiles (see the header) and the size of one
// staging buffer of each operand.
const A_LD: u32 = TILE_K + 8u;
const B_LD: u32 = TILE_N + 8u;
const A_STAGE: u32 = TILE_M * A_LD;
const B_STAGE: u32 = TILE_K * B_LD;

var<workgroup> a_tile: array<f16, {{A_TILE_LEN}}>;   // STAGES x TILE_M x A_LD, row-major
var<workgroup> b_tile: array<f16, {{B_TILE_LEN}}>;   // STAGES x TILE_K x B_LD, row-major
var<workgroup> c_frag: array<f32, {{C_FRAG_LEN}}>;   // one FRAG x FRAG fragment per subgroup

// The dequantisation hook: every value of the weight operand (a of a
// convolution, the transposed b of a linear layer) passes through here on
// its way from its chunk into the staging tiles, which hold f16 whatever
// the weights are stored as. f16 weights pass unchanged; a quantized format
// (GGUF blocks, fp8) reads its raw chunks and block scales in the fetch and
// decodes them here (TILE_K is a multiple of 16, so a 32-value block spans
// whole staging steps or two halves of one).
fn dequant_weight(x: f16) -> f16 {
    return x;
}

// #if CONV
// CONV = 1: where one invocation's next value of the implicit b comes
// from: input channel, kernel row and column of reduction index k.
struct Tap {
    ci: u32,
    ky: u32,
    kx: u32,
}

fn decode_tap(k: u32) -> Tap {
    let ci = k / max(p.cv_taps, 1u);
    let t = k - ci * p.cv_taps;
    let ky = t / max(p.cv_kw, 1u);
    return Tap(ci, ky, t - ky * p.cv_kw);
}

// The implicit b's value at *tap (reduction index kk) for output pixel
// (oy, ox) of item z, zero in the padding and past K; then *tap moves on by
// B_ROW_STEP along K (the invocation's next row of the tile): compares,
// not the two divisions of decode_tap, which cost more than the tile's
// tensor-core work.
fn next_tap(tap: ptr<function, Tap>, z: u32, oy: u32, ox: u32, kk: u32) -> f16 {
    let iy = oy * p.cv_stride + (*tap).ky;
    let ix = ox * p.cv_stride + (*tap).kx;
    // Unsigned: a row or column left of the padding wraps past the input.
    let y = iy - p.cv_pad_t;
    let x = ix - p.cv_pad_l;
    var v = f16(0.0);
    if (kk < p.k && iy >= p.cv_pad_t && ix >= p.cv_pad_l && y < p.cv_h && x < p.cv_w) {
        v = b[p.b_off + z * p.b_bstride + ((*tap).ci * p.cv_h + y) * p.cv_w + x];
    }
    let kh = p.cv_taps / max(p.cv_kw, 1u);
    (*tap).kx += B_ROW_STEP;
    while ((*tap).kx >= p.cv_kw) {
        (*tap).kx -= p.cv_kw;
        (*tap).ky += 1u;
    }
    while ((*tap).ky >= kh) {
        (*tap).ky -= kh;
        (*tap).ci += 1u;
    }
    return v;
}

// Row r of this invocation's share of the implicit b's staging tile.
fn put_b(v: f16, buf: u32, lid: u32, r: u32) {
    b_tile[buf * B_STAGE + (lid / TILE_N + r * B_ROW_STEP) * B_LD + lid % TILE_N] = v;
}
// #endif

// Chunk r of this invocation's share of a's tile at K offset kn: row
// i0 + c / A_PER_ROW, halves kn + (c % A_PER_ROW) * LOAD_A onward, where c
// counts the workgroup's chunks (consecutive invocations read consecutive
// chunks of a row). Rows past M read the last row; chunks past K are zeros
// (a chunk never straddles K: ops/matmul_coop.rs only runs LOAD_A > 1
// where K and every row start are multiples of LOAD_A).
fn fetch_a(z: u32, i0: u32, kn: u32, lid: u32, r: u32) -> AChunk {
    let c = lid + r * INVOCATIONS;
    let row = min(i0 + c / A_PER_ROW, p.m - 1u);
    let kk = kn + (c % A_PER_ROW) * LOAD_A;
    let at = p.a_off + z * p.a_bstride + row * p.lda + min(kk, p.k - LOAD_A);
    var v = A_ZERO;
    if (kk < p.k) {
        v = a[at / LOAD_A];
    }
    return v;
}

fn put_a(v: AChunk, buf: u32, lid: u32, r: u32) {
    let c = lid + r * INVOCATIONS;
    put_a_halves(v, buf * A_STAGE + (c / A_PER_ROW) * A_LD + (c % A_PER_ROW) * LOAD_A, 1u);
}

// #if TRANS_B
// As fetch_a, for b stored [N, K]: chunk r holds column j0 + c / B_PER_ROW
// at K offsets kn + (c % B_PER_ROW) * LOAD_B onward, staged transposed.
fn fetch_b(z: u32, j0: u32, kn: u32, lid: u32, r: u32) -> BChunk {
    let c = lid + r * INVOCATIONS;
    let col = min(j0 + c / B_PER_ROW, p.n - 1u);
    let kk = kn + (c % B_PER_ROW) * LOAD_B;
    let at = p.b_off + z * p.b_bstride + col * p.ldb + min(kk, p.k - LOAD_B);
    var v = B_ZERO;
    if (kk < p.k) {
        v = b[at / LOAD_B];
    }
    return v;
}

fn put_b(v: BChunk, buf: u32, lid: u32, r: u32) {
    let c = lid + r * INVOCATIONS;
    put_b_halves(v, buf * B_STAGE + (c % B_PER_ROW) * LOAD_B * B_LD + c / B_PER_ROW, B_LD);
}
// #endif

// #if PLAIN_B
// b stored [K, N]: chunk r holds row kn + c / B_PER_ROW at columns
// j0 + (c % B_PER_ROW) * LOAD_B onward (the last chunk of N past it).
fn fetch_b(z: u32, j0: u32, kn: u32, lid: u32, r: u32) -> BChunk {
    let c = lid + r * INVOCATIONS;
    let kk = kn + c / B_PER_ROW;
    let col = min(j0 + (c % B_PER_ROW) * LOAD_B, p.n - LOAD_B);
    let at = p.b_off + z * p.b_bstride + min(kk, p.k - 1u) * p.ldb + col;
    var v = B_ZERO;
    if (kk < p.k) {
        v = b[at / LOAD_B];
    }
    return v;
}

fn put_b(v: BChunk, buf: u32, lid: u32, r: u32) {
    let c = lid + r * INVOCATIONS;
    put_b_halves(v, buf * B_STAGE + (c / B_PER_ROW) * B_LD + (c % B_PER_ROW) * LOAD_B, 1u);
}
// #endif

{{STAGING}}

// #if COOP
// The accumulator into this subgroup's slot of c_frag.
fn stash(acc: Acc, sg: u32, lane: u32) {
    coopStoreT(acc, &c_frag[sg * FRAG * FRAG], FRAG);
}
// #endif

// #if TWIN
// The portable twin's fragments: lane l of a subgroup holds elements
// l, l + SUBGROUP, ... of each FRAG x FRAG accumulator (row-major), and a
// multiply-add is plain f32 arithmetic on the staged f16 tiles: the same
// products, summed in another order than the tensor cores may.
const ACC_PER_LANE: u32 = FRAG * FRAG / SUBGROUP;
alias Acc = array<f32, ACC_PER_LANE>;

fn twin_mma(acc: ptr<function, Acc>, a_at: u32, b_at: u32, lane: u32) {
    for (var q = 0u; q < ACC_PER_LANE; q += 1u) {
        let e = lane + q * SUBGROUP;
        let r = e / FRAG;
        let c = e % FRAG;
        var s = (*acc)[q];
        for (var kk = 0u; kk < FRAG; kk += 1u) {
            s += f32(a_tile[a_at + r * A_LD + kk]) * f32(b_tile[b_at + kk * B_LD + c]);
        }
        (*acc)[q] = s;
    }
}

fn stash(acc: Acc, sg: u32, lane: u32) {
    for (var q = 0u; q < ACC_PER_LANE; q += 1u) {
        c_frag[sg * FRAG * FRAG + lane + q * SUBGROUP] = acc[q];
    }
}
// #endif

// Applies the epilogue to the fragment in this subgroup's slot of c_frag,
// whose (0, 0) is output (i0, j0).
fn epilogue(sg: u32, lane: u32, z: u32, i0: u32, j0: u32) {
    let base = sg * FRAG * FRAG;
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
}

@compute @workgroup_size({{INVOCATIONS}})
fn matmul_coop(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let z = wid.z;
    let i0 = wid.y * TILE_M;
    let j0 = wid.x * TILE_N;
    // Subgroups of a 1-D workgroup are consecutive invocations.
    let sg = lid / SUBGROUP;
    let lane = lid % SUBGROUP;
    let sm = (sg / SG_N) * FRAGS_M * FRAG;
    let sn = (sg % SG_N) * FRAGS_N * FRAG;
    // CONV = 1: this invocation's output pixel (one column of the tile for
    // every row it stages; columns past N repeat the last one).
    let cj = min(j0 + lid % TILE_N, p.n - 1u);
    let oy = p.cv_oy0 + cj / max(p.cv_wo, 1u);
    let ox = cj % max(p.cv_wo, 1u);

{{ACCUMULATORS}}

    let steps = (p.k + TILE_K - 1u) / TILE_K;
{{REGISTERS}}
    if (steps > 0u) {
{{FETCH_FIRST}}
{{PUT_FIRST}}
    }
    workgroupBarrier();
    for (var t = 0u; t < steps; t += 1u) {
        let cur = t % STAGES;
        let nxt = (t + 1u) % STAGES;
        let kn = (t + 1u) * TILE_K;
        let more = t + 1u < steps;
        if (more) {
{{FETCH_NEXT}}
        }
{{MULTIPLY}}
        if (STAGES == 1u) {
            workgroupBarrier();
        }
        if (more) {
{{PUT_NEXT}}
        }
        workgroupBarrier();
    }

{{STORE}}
}
