// Batched matrix multiply with a fused epilogue:
//   out[z, i, j] = ACT(alpha * sum_k a[z, i, k] * b[z, k, j] + bias) * scale
//                  + residual_scale * residual[z, i, j]
// (the residual, laid out as `out`, is the skip connection of the layer the
// product ends: one read of it here instead of a separate add's read of both
// and write).
// Two kernels compute it, picked by adapter in ops/matmul.rs:
//   matmul_tiled   GPUs: workgroup-memory tiles, operands read straight from storage buffers.
//   gemm_packed    CPU adapters (lavapipe): operands first copied (pack_rows, pack_rows4,
//                  pack_cols4) into 64 KiB blocks read as uniform buffers (see "The
//                  CPU-adapter path" below).
// conv2d (ops/conv2d.rs) reuses gemm_packed with its own packing kernels.

// One parameter block for both product kernels; each reads the fields it needs.
struct Params {
    m: u32,             // rows of the product (gemm_packed: of this tile)
    n: u32,             // columns (gemm_packed: of this tile)
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
    accumulate: u32,    // 1: add the partial sums of earlier chunks of K (in `out`; gemm_packed: in partial_in)
    finish: u32,        // 1: last chunk of K: add the bias, apply the activation, write out
    bias_per_row: u32,  // 1: bias[i] (conv2d's output channels are rows), else bias[j]
    kw4: u32,           // gemm_packed: vec4 words per block row
    nch: u32,           // gemm_packed: K chunks (bound blocks) in this pass, 1..6
    klast4: u32,        // gemm_packed: vec4 words of K in the last of them
    row0: u32,          // gemm_packed: first row of the tile this dispatch computes
    partial_ld: u32,    // gemm_packed: row stride of the partial sums (a multiple of 4)
    col0: u32,          // gemm_packed: the product's column of the tile's column 0
    col_group: u32,     // gemm_packed: columns per output item (see out_column)
    col_group_stride: u32,
    res_off: u32,       // element offset in `residual` of out[out_off]
    has_residual: u32,
    scale: f32,
    residual_scale: f32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

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

fn gelu_erf(x: f32) -> f32 {
    return 0.5 * x * (1.0 + erf_approx(x * 0.7071067811865476));
}

fn activate(x: f32) -> f32 {
    switch ACT {
        case 1u: { return x * sigmoid(x); }
        case 2u: { return gelu_erf(x); }
        case 3u: {
            // tanh has saturated long before |u| = 10; the clamp keeps exp() finite on every driver.
            let u = clamp(0.7978845608028654 * (x + 0.044715 * x * x * x), -10.0, 10.0);
            return 0.5 * x * (1.0 + tanh(u));
        }
        case 4u: { return x * sigmoid(1.702 * x); }
        default: { return x; }
    }
}

// ---------------------------------------------------------------------------
// matmul_tiled: GPUs.
//   @binding(1) a     array<st> (read): item z at a_off + z * a_bstride, (i, k) at + i * lda + k
//   @binding(2) b     array<st> (read): item z at b_off + z * b_bstride;
//                     TRANS_B = 0: (k, j) at + k * ldb + j; TRANS_B = 1: (k, j) at + j * ldb + k
//   @binding(3) bias  array<st> (read): bias[bias_off + j], read only when has_bias = 1
//   @binding(4) out   array<st> (read_write): (z, i, j) at out_off + z * o_bstride + i * ldo + j
//   @binding(19) residual array<st> (read): out[o]'s residual at res_off + o - out_off, read
//                     only when has_residual = 1
// A product too large for one binding runs in windows of rows, columns and,
// when even one row does not fit, chunks of K summed in `out` (`accumulate`,
// `finish`).

@group(0) @binding(1) var<storage, read> a: array<st>;
@group(0) @binding(2) var<storage, read> b: array<st>;
@group(0) @binding(3) var<storage, read> bias: array<st>;
@group(0) @binding(4) var<storage, read_write> out: array<st>;
@group(0) @binding(19) var<storage, read> residual: array<st>;

// The end of the epilogue, after the activation: the output scale and the
// residual of out[o].
fn finish_value(o: u32, v: f32) -> f32 {
    var r = v * p.scale;
    if (p.has_residual == 1u) {
        r += p.residual_scale * f32(residual[p.res_off + o - p.out_off]);
    }
    return r;
}

// 1: b is [N, K] (nn.Linear's weight layout).
override TRANS_B: u32 = 0u;

// Writes the dot product of column j at `out[o]`, through the epilogue.
fn store(o: u32, j: u32, dot: f32) {
    var v = p.alpha * dot;
    if (p.accumulate == 1u) {
        v += f32(out[o]);
    }
    if (p.finish == 1u) {
        if (p.has_bias == 1u) {
            v += f32(bias[p.bias_off + j]);
        }
        v = finish_value(o, activate(v));
    }
    out[o] = st(v);
}

// A 64 x 64 output tile per workgroup of 16 x 16 invocations, 4 x 4 outputs
// each, over K in steps of 16 staged in workgroup memory.
const TILE: u32 = 64u;
const TILE_K: u32 = 16u;
// One column of padding: stores that walk K then hit different banks.
var<workgroup> a_tile: array<array<f32, TILE + 1u>, TILE_K>;
var<workgroup> b_tile: array<array<f32, TILE + 1u>, TILE_K>;

fn load_a(z: u32, i: u32, kk: u32) -> f32 {
    if (i >= p.m || kk >= p.k) {
        return 0.0;
    }
    return f32(a[p.a_off + z * p.a_bstride + i * p.lda + kk]);
}

fn load_b(z: u32, kk: u32, j: u32) -> f32 {
    if (j >= p.n || kk >= p.k) {
        return 0.0;
    }
    if (TRANS_B == 1u) {
        return f32(b[p.b_off + z * p.b_bstride + j * p.ldb + kk]);
    }
    return f32(b[p.b_off + z * p.b_bstride + kk * p.ldb + j]);
}

@compute @workgroup_size(16, 16)
fn matmul_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let z = wid.z;
    let i0 = wid.y * TILE;
    let j0 = wid.x * TILE;
    let t = lid.y * 16u + lid.x;
    var acc: array<array<f32, 4>, 4>;
    for (var k0 = 0u; k0 < p.k; k0 += TILE_K) {
        // 256 invocations stage 16 x 64 values of each operand, 4 each;
        // consecutive invocations read consecutive addresses: along K in a
        // and a transposed b, along N in a plain b.
        for (var s = 0u; s < 4u; s++) {
            let e = t + s * 256u;
            a_tile[e % TILE_K][e / TILE_K] = load_a(z, i0 + e / TILE_K, k0 + e % TILE_K);
            if (TRANS_B == 1u) {
                b_tile[e % TILE_K][e / TILE_K] = load_b(z, k0 + e % TILE_K, j0 + e / TILE_K);
            } else {
                b_tile[e / TILE][e % TILE] = load_b(z, k0 + e / TILE, j0 + e % TILE);
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TILE_K; kk++) {
            var av: array<f32, 4>;
            var bv: array<f32, 4>;
            for (var r = 0u; r < 4u; r++) {
                av[r] = a_tile[kk][lid.y + 16u * r];
                bv[r] = b_tile[kk][lid.x + 16u * r];
            }
            for (var r = 0u; r < 4u; r++) {
                for (var c = 0u; c < 4u; c++) {
                    acc[r][c] = fma(av[r], bv[c], acc[r][c]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < 4u; r++) {
        let i = i0 + lid.y + 16u * r;
        for (var c = 0u; c < 4u; c++) {
            let j = j0 + lid.x + 16u * c;
            if (i < p.m && j < p.n) {
                store(p.out_off + z * p.o_bstride + i * p.ldo + j, j, acc[r][c]);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The CPU-adapter path.
//
// Why: lavapipe (Mesa 22.x) runs 8 invocations as the SIMD lanes of one CPU
// thread. A storage-buffer load becomes a loop over the lanes that inserts
// each value into a vector on the stack (a store-forwarding stall per value,
// ~25 cycles), while a uniform-buffer load is a plain 8-wide gather (~3
// cycles per value) and subgroupBroadcast is one shuffle. So both operands
// are first copied (pack_rows here, pack_taps in conv2d) into blocks of 64 KiB —
// the largest uniform binding — and gemm_packed reads them as uniform
// buffers: 16 or 32 rows of a per subgroup, one gathered vec4 per lane for 8 of
// them then shared by subgroupBroadcast, and 4 columns of b per lane.
//
// Packed layout: a matrix of R rows x K is cut into row blocks of 16384 / kw
// rows and K chunks of kw 32-bit words (f32: one value; f16: two, low half
// first). Block (z, row block, chunk) is at word ((z * n_rb + rb) * n_kc + kc) * 16384,
// row r of it at + r * kw. Words past the matrix (rows or K) are zero: the
// packing kernels write only rows of the matrix into a new (zeroed) buffer.

const BLOCK_WORDS: u32 = 16384u;

// 1: words hold two f16 values (st = f16).
override PACKED_F16: bool = false;

struct PackParams {
    rows: u32,         // valid rows of the source (per item)
    k: u32,            // valid values along K
    src_off: u32,      // element offset of row `row0` of item 0 in `src`
    src_bstride: u32,
    row_stride: u32,   // source element stride between rows
    k_stride: u32,     // ... and along K (1 for a row-major a or a transposed b)
    kw: u32,           // words per block row (a power of two)
    rb: u32,           // rows per block (a power of two)
    kw_shift: u32,     // log2(kw)
    rb_shift: u32,     // log2(rb)
    n_rb: u32,         // row blocks per item
    n_kc: u32,         // K chunks
    row0: u32,         // first row this dispatch packs
    dst_base: u32,     // word index (in the whole packed operand) of packed[0]
    grid_rows: u32,    // pack_rows4: rows of the matrix this dispatch packs (from row0)
    _pad1: u32,
}

// pack_rows bindings (no entry point uses both these and the product's):
//   @binding(0) pk      uniform PackParams
//   @binding(1) src     array<st> (read): (z, row, k) at src_off + z * src_bstride + (row - row0) * row_stride + k * k_stride
//   @binding(2) packed  array<u32> (read_write): the blocks, from word dst_base
@group(0) @binding(0) var<uniform> pk: PackParams;
@group(0) @binding(1) var<storage, read> src: array<st>;
@group(0) @binding(2) var<storage, read_write> packed: array<u32>;

fn source_value(z: u32, row: u32, kk: u32) -> f32 {
    if (row >= pk.rows || kk >= pk.k) {
        return 0.0;
    }
    return f32(src[pk.src_off + z * pk.src_bstride + (row - pk.row0) * pk.row_stride + kk * pk.k_stride]);
}

// One packed word per invocation: x walks the words of a row along K (over
// all chunks), y the rows of the matrix from row0, z the items. Block shapes are powers of
// two, so the word's place takes shifts and masks: a lane division would be
// eight scalar divisions on a CPU adapter.
@compute @workgroup_size(32)
fn pack_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    let word = gid.x;
    let row = pk.row0 + gid.y;
    let z = gid.z;
    // The grid is rounded up to whole workgroups: words past the last chunk
    // would land in the next row block's first chunk and race with its
    // writer.
    if (word >= pk.n_kc * pk.kw) {
        return;
    }
    let kc = word >> pk.kw_shift;
    let rb = row >> pk.rb_shift;
    let at = ((z * pk.n_rb + rb) * pk.n_kc + kc) * BLOCK_WORDS
        + (row & (pk.rb - 1u)) * pk.kw + (word & (pk.kw - 1u));
    var v: u32;
    if (PACKED_F16) {
        v = pack2x16float(vec2(source_value(z, row, 2u * word), source_value(z, row, 2u * word + 1u)));
    } else {
        v = bitcast<u32>(source_value(z, row, word));
    }
    packed[at - pk.dst_base] = v;
}

// pack_rows4: the same for a source whose rows are contiguous along K and
// start at multiples of 4 values, 4 words per invocation: one vec4 load and
// store where pack_rows makes 4 (each a loop over the lanes on a CPU adapter).
//   @binding(3) src4     the source as array<st4>
//   @binding(4) packed4  the blocks as array<vec4<u32>>, from word dst_base
@group(0) @binding(3) var<storage, read> src4: array<st4>;
@group(0) @binding(4) var<storage, read_write> packed4: array<vec4<u32>>;

// Values 4 * k4 .. 4 * k4 + 3 of a row, 0 past K.
fn source4(z: u32, row: u32, k4: u32) -> vec4<f32> {
    let first = (pk.src_off + z * pk.src_bstride + (row - pk.row0) * pk.row_stride) / 4u;
    let v = vec4<f32>(src4[min(first + k4, arrayLength(&src4) - 1u)]);
    let k = 4u * k4;
    return select(vec4(0.0), v, vec4(k, k + 1u, k + 2u, k + 3u) < vec4(pk.k));
}

//
// A workgroup is 8 vec4s of each of 4 rows, so that rows of only 16 vec4s
// (K = 64 in f32, the most common linear layer of the small models) keep
// every lane busy: with 32 vec4s of one row per workgroup half the lanes had
// nothing to do. (x, y) = (vec4 of the row, row from row0), z = item.
@compute @workgroup_size(8, 4)
fn pack_rows4(@builtin(global_invocation_id) gid: vec3<u32>) {
    let word = 4u * gid.x;
    let row = pk.row0 + gid.y;
    let z = gid.z;
    if (word >= pk.n_kc * pk.kw || gid.y >= pk.grid_rows) {
        return;
    }
    let at = ((z * pk.n_rb + (row >> pk.rb_shift)) * pk.n_kc + (word >> pk.kw_shift)) * BLOCK_WORDS
        + (row & (pk.rb - 1u)) * pk.kw + (word & (pk.kw - 1u));
    var v: vec4<u32>;
    if (PACKED_F16) {
        let lo = source4(z, row, 2u * gid.x);
        let hi = source4(z, row, 2u * gid.x + 1u);
        v = vec4(pack2x16float(lo.xy), pack2x16float(lo.zw), pack2x16float(hi.xy), pack2x16float(hi.zw));
    } else {
        v = bitcast<vec4<u32>>(source4(z, row, gid.x));
    }
    packed4[(at - pk.dst_base) / 4u] = v;
}

// pack_cols4: a source whose rows run across memory (a plain b, packed by
// columns: row_stride = 1) with 4 rows per invocation, read with one vec4
// load per value of K (two per f16 word). Bindings as pack_rows4 but `packed`
// (2) for the scattered words.
@compute @workgroup_size(32)
fn pack_cols4(@builtin(global_invocation_id) gid: vec3<u32>) {
    let word = gid.x;
    let row = pk.row0 + 4u * gid.y;
    let z = gid.z;
    if (word >= pk.n_kc * pk.kw) {
        return;
    }
    let first = (pk.src_off + z * pk.src_bstride + (row - pk.row0)) / 4u;
    let k_step = pk.k_stride / 4u;
    let rows_ok = vec4(row, row + 1u, row + 2u, row + 3u) < vec4(pk.rows);
    var v: vec4<u32>;
    if (PACKED_F16) {
        let k = 2u * word;
        let lo = select(vec4(0.0), vec4<f32>(src4[min(first + k * k_step, arrayLength(&src4) - 1u)]), rows_ok & vec4(k < pk.k));
        let hi = select(vec4(0.0), vec4<f32>(src4[min(first + (k + 1u) * k_step, arrayLength(&src4) - 1u)]), rows_ok & vec4(k + 1u < pk.k));
        v = vec4(pack2x16float(vec2(lo.x, hi.x)), pack2x16float(vec2(lo.y, hi.y)),
                 pack2x16float(vec2(lo.z, hi.z)), pack2x16float(vec2(lo.w, hi.w)));
    } else {
        v = bitcast<vec4<u32>>(select(vec4(0.0), vec4<f32>(src4[min(first + word * k_step, arrayLength(&src4) - 1u)]), rows_ok & vec4(word < pk.k)));
    }
    for (var r = 0u; r < 4u; r++) {
        let at = ((z * pk.n_rb + ((row + r) >> pk.rb_shift)) * pk.n_kc + (word >> pk.kw_shift)) * BLOCK_WORDS
            + ((row + r) & (pk.rb - 1u)) * pk.kw + (word & (pk.kw - 1u));
        if (row + r < pk.rows) {
            packed[at - pk.dst_base] = v[r];
        }
    }
}

alias Block = array<vec4<u32>, 4096>;
@group(0) @binding(5) var<uniform> a0: Block;
@group(0) @binding(6) var<uniform> a1: Block;
@group(0) @binding(7) var<uniform> a2: Block;
@group(0) @binding(8) var<uniform> a3: Block;
@group(0) @binding(9) var<uniform> a4: Block;
@group(0) @binding(10) var<uniform> a5: Block;
@group(0) @binding(11) var<uniform> b0: Block;
@group(0) @binding(12) var<uniform> b1: Block;
@group(0) @binding(13) var<uniform> b2: Block;
@group(0) @binding(14) var<uniform> b3: Block;
@group(0) @binding(15) var<uniform> b4: Block;
@group(0) @binding(16) var<uniform> b5: Block;
// Partial sums of a tile between passes over K (f32, row-major with stride
// partial_ld): read as a uniform buffer, written as a storage buffer, two
// buffers taking turns.
@group(0) @binding(17) var<uniform> partial_in: array<vec4<f32>, 4096>;
@group(0) @binding(18) var<storage, read_write> partial_out: array<vec4<f32>>;
// The windows of `out` (4) and `residual` (19) again, as vec4s (see the
// stores at the end of gemm_packed).
@group(0) @binding(20) var<storage, read_write> out_v4: array<st4>;
@group(0) @binding(21) var<storage, read> residual_v4: array<st4>;

// acc[r][c] += sum over 4 values of K of a[r][k] * b[k][c].
fn rank4(acc: ptr<function, array<vec4<f32>, 32>>, r: u32, a_r: vec4<f32>,
         k0: vec4<f32>, k1: vec4<f32>, k2: vec4<f32>, k3: vec4<f32>) {
    (*acc)[r] = fma(vec4(a_r.x), k0, fma(vec4(a_r.y), k1, fma(vec4(a_r.z), k2, fma(vec4(a_r.w), k3, (*acc)[r]))));
}

// The same for a word group of f16 pairs: 8 values of K, low halves first.
fn rank8(acc: ptr<function, array<vec4<f32>, 32>>, r: u32, w: vec4<u32>,
         k0: vec4<f32>, k1: vec4<f32>, k2: vec4<f32>, k3: vec4<f32>,
         k4: vec4<f32>, k5: vec4<f32>, k6: vec4<f32>, k7: vec4<f32>) {
    rank4(acc, r, vec4(unpack2x16float(w.x), unpack2x16float(w.y)), k0, k1, k2, k3);
    rank4(acc, r, vec4(unpack2x16float(w.z), unpack2x16float(w.w)), k4, k5, k6, k7);
}

// Rows r0..r0 + 7 (lane l's word `a` is row r0 + l) against this lane's
// columns, f32. subgroupBroadcast needs a constant lane, hence the unrolling.
fn rows8(acc: ptr<function, array<vec4<f32>, 32>>, r0: u32, a: vec4<f32>,
         k0: vec4<f32>, k1: vec4<f32>, k2: vec4<f32>, k3: vec4<f32>) {
    rank4(acc, r0, subgroupBroadcast(a, 0u), k0, k1, k2, k3);
    rank4(acc, r0 + 1u, subgroupBroadcast(a, 1u), k0, k1, k2, k3);
    rank4(acc, r0 + 2u, subgroupBroadcast(a, 2u), k0, k1, k2, k3);
    rank4(acc, r0 + 3u, subgroupBroadcast(a, 3u), k0, k1, k2, k3);
    rank4(acc, r0 + 4u, subgroupBroadcast(a, 4u), k0, k1, k2, k3);
    rank4(acc, r0 + 5u, subgroupBroadcast(a, 5u), k0, k1, k2, k3);
    rank4(acc, r0 + 6u, subgroupBroadcast(a, 6u), k0, k1, k2, k3);
    rank4(acc, r0 + 7u, subgroupBroadcast(a, 7u), k0, k1, k2, k3);
}

// The same for f16 pairs.
fn rows8_f16(acc: ptr<function, array<vec4<f32>, 32>>, r0: u32, a: vec4<u32>,
             k0: vec4<f32>, k1: vec4<f32>, k2: vec4<f32>, k3: vec4<f32>,
             k4: vec4<f32>, k5: vec4<f32>, k6: vec4<f32>, k7: vec4<f32>) {
    rank8(acc, r0, subgroupBroadcast(a, 0u), k0, k1, k2, k3, k4, k5, k6, k7);
    rank8(acc, r0 + 1u, subgroupBroadcast(a, 1u), k0, k1, k2, k3, k4, k5, k6, k7);
    rank8(acc, r0 + 2u, subgroupBroadcast(a, 2u), k0, k1, k2, k3, k4, k5, k6, k7);
    rank8(acc, r0 + 3u, subgroupBroadcast(a, 3u), k0, k1, k2, k3, k4, k5, k6, k7);
    rank8(acc, r0 + 4u, subgroupBroadcast(a, 4u), k0, k1, k2, k3, k4, k5, k6, k7);
    rank8(acc, r0 + 5u, subgroupBroadcast(a, 5u), k0, k1, k2, k3, k4, k5, k6, k7);
    rank8(acc, r0 + 6u, subgroupBroadcast(a, 6u), k0, k1, k2, k3, k4, k5, k6, k7);
    rank8(acc, r0 + 7u, subgroupBroadcast(a, 7u), k0, k1, k2, k3, k4, k5, k6, k7);
}

// Groups of 8 rows per gemm_packed workgroup: 4 (32 rows) or 2 (16).
// ops/matmul.rs picks 4 where K is long and 2 where it is short: 32 rows
// gather a third fewer operand values per product (a gathered value is most
// of the cost on lavapipe), but measured slower on products with K under
// 128 (the small models' linear layers).
override ROW_GROUPS: u32 = 4u;

// One vec4 word group along K: the 32 rows of a (lane l's words r0..r3 are
// rows l, 8 + l, 16 + l, 24 + l) and this lane's 4 columns c0..c3 of b.
fn kstep(acc: ptr<function, array<vec4<f32>, 32>>, r0: vec4<u32>, r1: vec4<u32>,
         r2: vec4<u32>, r3: vec4<u32>,
         c0: vec4<u32>, c1: vec4<u32>, c2: vec4<u32>, c3: vec4<u32>) {
    if (PACKED_F16) {
        // Word q of a column holds K values 2q (low half) and 2q + 1.
        let x0 = unpack2x16float(c0.x); let x1 = unpack2x16float(c1.x); let x2 = unpack2x16float(c2.x); let x3 = unpack2x16float(c3.x);
        let y0 = unpack2x16float(c0.y); let y1 = unpack2x16float(c1.y); let y2 = unpack2x16float(c2.y); let y3 = unpack2x16float(c3.y);
        let z0 = unpack2x16float(c0.z); let z1 = unpack2x16float(c1.z); let z2 = unpack2x16float(c2.z); let z3 = unpack2x16float(c3.z);
        let w0 = unpack2x16float(c0.w); let w1 = unpack2x16float(c1.w); let w2 = unpack2x16float(c2.w); let w3 = unpack2x16float(c3.w);
        let k0 = vec4(x0.x, x1.x, x2.x, x3.x);
        let k1 = vec4(x0.y, x1.y, x2.y, x3.y);
        let k2 = vec4(y0.x, y1.x, y2.x, y3.x);
        let k3 = vec4(y0.y, y1.y, y2.y, y3.y);
        let k4 = vec4(z0.x, z1.x, z2.x, z3.x);
        let k5 = vec4(z0.y, z1.y, z2.y, z3.y);
        let k6 = vec4(w0.x, w1.x, w2.x, w3.x);
        let k7 = vec4(w0.y, w1.y, w2.y, w3.y);
        rows8_f16(acc, 0u, r0, k0, k1, k2, k3, k4, k5, k6, k7);
        rows8_f16(acc, 8u, r1, k0, k1, k2, k3, k4, k5, k6, k7);
        if (ROW_GROUPS > 2u) {
            rows8_f16(acc, 16u, r2, k0, k1, k2, k3, k4, k5, k6, k7);
            rows8_f16(acc, 24u, r3, k0, k1, k2, k3, k4, k5, k6, k7);
        }
    } else {
        let f0 = bitcast<vec4<f32>>(c0);
        let f1 = bitcast<vec4<f32>>(c1);
        let f2 = bitcast<vec4<f32>>(c2);
        let f3 = bitcast<vec4<f32>>(c3);
        let k0 = vec4(f0.x, f1.x, f2.x, f3.x);
        let k1 = vec4(f0.y, f1.y, f2.y, f3.y);
        let k2 = vec4(f0.z, f1.z, f2.z, f3.z);
        let k3 = vec4(f0.w, f1.w, f2.w, f3.w);
        rows8(acc, 0u, bitcast<vec4<f32>>(r0), k0, k1, k2, k3);
        rows8(acc, 8u, bitcast<vec4<f32>>(r1), k0, k1, k2, k3);
        if (ROW_GROUPS > 2u) {
            rows8(acc, 16u, bitcast<vec4<f32>>(r2), k0, k1, k2, k3);
            rows8(acc, 24u, bitcast<vec4<f32>>(r3), k0, k1, k2, k3);
        }
    }
}

// Vec4 words of K in chunk c (0-based) of this pass.
fn chunk_len(c: u32) -> u32 {
    return select(p.kw4, p.klast4, c + 1u == p.nch);
}

// Where column x of the product lies in `out`, relative to column 0: the
// columns come in groups of col_group, each group col_group_stride values
// after the one before (conv2d puts several batch items side by side, each a
// group of output pixels; a plain product has one group).
fn out_column(x: u32) -> u32 {
    return (x / p.col_group) * p.col_group_stride + x % p.col_group;
}

// GEGLU in the store (ops/matmul.rs, linear_geglu): the product's columns
// come in groups of 8, 4 of the value half then the same 4 of the gate half,
// so an even lane holds values and the odd lane beside it their gates. The
// even lane writes value * gelu(gate) at column j0 / 2 of `out` (ldo and
// out_off count the output's columns); the product itself is not stored.
// Both halves are first rounded to the storage type, as a stored product
// would be before elementwise.wgsl's geglu read it back: the results are that
// kernel's bit for bit.
override GEGLU: bool = false;

fn store_geglu(i: u32, j0: u32, sid: u32, cols: u32, v: vec4<f32>) {
    let h = vec4<f32>(st4(v));
    // Every lane takes part: the exchange needs the whole subgroup.
    let gate = subgroupShuffleXor(h, 1u);
    if ((sid & 1u) != 0u || cols < 4u) {
        return;
    }
    let y = h * vec4(gelu_erf(gate.x), gelu_erf(gate.y), gelu_erf(gate.z), gelu_erf(gate.w));
    let o = p.out_off + i * p.ldo + j0 / 2u;
    if ((o & 3u) == 0u && o / 4u < arrayLength(&out_v4)) {
        out_v4[o / 4u] = st4(y);
    } else {
        for (var c = 0u; c < 4u; c++) {
            out[o + c] = st(y[c]);
        }
    }
}

// One tile of up to 16384 / kw rows x 16384 / kw columns per dispatch: the
// bound blocks a0..a5 are K chunks of the tile's rows, b0..b5 of its columns
// (unused slots repeat a bound block). Each workgroup is one subgroup of 8
// lanes and computes 8 * ROW_GROUPS rows x 32 columns, of the m rows from tile row row0
// and the n columns; out, bias and the epilogue are as for matmul_tiled, with
// (i, j) counted from (row0, 0) (out_off and bias_off point there) and
// columns placed by out_column.
// Bindings: bias (3), out (4) and residual (19) as for matmul_tiled; a0..a5 (5..10) and
// b0..b5 (11..16) uniform blocks; partial_in (17) and partial_out (18).
// A product with more K chunks than one dispatch binds runs in passes: each
// but the last writes its sums (plus those of the passes before: accumulate
// = 1) to partial_out; the last (finish = 1) adds bias and activation and
// writes out. (A read-modify-write of `out` would cost more than the pass.)
@compute @workgroup_size(8)
fn gemm_packed(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) sid: u32) {
    let i0 = wid.y * 8u * ROW_GROUPS;
    let j0 = wid.x * 32u + sid * 4u;
    let q0 = (p.row0 + i0 + sid) * p.kw4;
    let q1 = q0 + 8u * p.kw4;
    let q2 = q1 + 8u * p.kw4;
    let q3 = q2 + 8u * p.kw4;
    let c0 = j0 * p.kw4;
    let c1 = c0 + p.kw4;
    let c2 = c1 + p.kw4;
    let c3 = c2 + p.kw4;
    var acc: array<vec4<f32>, 32>;
    // Bindings cannot be indexed, so each chunk has its own loop.
    for (var q = 0u; q < chunk_len(0u); q++) {
        kstep(&acc, a0[q0 + q], a0[q1 + q], a0[q2 + q], a0[q3 + q],
                  b0[c0 + q], b0[c1 + q], b0[c2 + q], b0[c3 + q]);
    }
    if (p.nch > 1u) {
        for (var q = 0u; q < chunk_len(1u); q++) {
            kstep(&acc, a1[q0 + q], a1[q1 + q], a1[q2 + q], a1[q3 + q],
                  b1[c0 + q], b1[c1 + q], b1[c2 + q], b1[c3 + q]);
        }
    }
    if (p.nch > 2u) {
        for (var q = 0u; q < chunk_len(2u); q++) {
            kstep(&acc, a2[q0 + q], a2[q1 + q], a2[q2 + q], a2[q3 + q],
                  b2[c0 + q], b2[c1 + q], b2[c2 + q], b2[c3 + q]);
        }
    }
    if (p.nch > 3u) {
        for (var q = 0u; q < chunk_len(3u); q++) {
            kstep(&acc, a3[q0 + q], a3[q1 + q], a3[q2 + q], a3[q3 + q],
                  b3[c0 + q], b3[c1 + q], b3[c2 + q], b3[c3 + q]);
        }
    }
    if (p.nch > 4u) {
        for (var q = 0u; q < chunk_len(4u); q++) {
            kstep(&acc, a4[q0 + q], a4[q1 + q], a4[q2 + q], a4[q3 + q],
                  b4[c0 + q], b4[c1 + q], b4[c2 + q], b4[c3 + q]);
        }
    }
    if (p.nch > 5u) {
        for (var q = 0u; q < chunk_len(5u); q++) {
            kstep(&acc, a5[q0 + q], a5[q1 + q], a5[q2 + q], a5[q3 + q],
                  b5[c0 + q], b5[c1 + q], b5[c2 + q], b5[c3 + q]);
        }
    }
    // The stores run as a loop over the rows of a copy of the sums: fully
    // unrolled, every store (a loop over the lanes on lavapipe) would make
    // the kernel many times slower to compile.
    var sums = acc;
    var col_bias = vec4(0.0);
    if (p.finish == 1u && p.has_bias == 1u && p.bias_per_row == 0u) {
        for (var c = 0u; c < 4u; c++) {
            col_bias[c] = f32(bias[p.bias_off + min(j0 + c, p.n - 1u)]);
        }
    }
    let cols = min(p.n - min(j0, p.n), 4u);
    let first = out_column(p.col0);
    let col_at = vec4(out_column(p.col0 + j0), out_column(p.col0 + j0 + 1u),
                      out_column(p.col0 + j0 + 2u), out_column(p.col0 + j0 + 3u)) - vec4(first);
    // Where this lane's 4 columns are 4 neighbouring values of a row of
    // `out`, 4-aligned (a plain product whose row stride and offset are
    // multiples of 4; conv2d's pixels within one item), each row is stored
    // as one vec4 (out_v4, the same window as `out`): a store is a loop
    // over the lanes on lavapipe, so this makes one loop where the scalar
    // path makes four, and the same for the residual. With K of 64-128 (the
    // small models' linear layers) these stores were over half the kernel.
    let vec_cols = cols == 4u && all(col_at == vec4(col_at.x) + vec4(0u, 1u, 2u, 3u))
        && (p.ldo & 3u) == 0u && ((p.out_off + col_at.x) & 3u) == 0u
        && (p.has_residual == 0u || (p.res_off & 3u) == (p.out_off & 3u));
    for (var r = 0u; r < 8u * ROW_GROUPS; r++) {
        let i = i0 + r;
        if (i >= p.m) {
            break;
        }
        // Partial sums of earlier passes: this lane's 4 columns are one vec4.
        let at = (i * p.partial_ld + j0) / 4u;
        var v = p.alpha * sums[r];
        if (p.accumulate == 1u) {
            v += partial_in[at];
        }
        if (p.finish == 0u) {
            partial_out[at] = v;
            continue;
        }
        if (p.has_bias == 1u) {
            if (p.bias_per_row == 1u) {
                v += f32(bias[p.bias_off + i]);
            } else {
                v += col_bias;
            }
        }
        v = vec4(activate(v.x), activate(v.y), activate(v.z), activate(v.w));
        if (GEGLU) {
            store_geglu(i, j0, sid, cols, v);
            continue;
        }
        let o = p.out_off + i * p.ldo;
        let o4 = (o + col_at.x) / 4u;
        let r4 = (p.res_off + o + col_at.x - p.out_off) / 4u;
        if (vec_cols && o4 < arrayLength(&out_v4)
            && (p.has_residual == 0u || r4 < arrayLength(&residual_v4))) {
            var f = v * p.scale;
            if (p.has_residual == 1u) {
                f += p.residual_scale * vec4<f32>(residual_v4[r4]);
            }
            out_v4[o4] = st4(f);
            continue;
        }
        for (var c = 0u; c < cols; c++) {
            out[o + col_at[c]] = st(finish_value(o + col_at[c], v[c]));
        }
    }
}
