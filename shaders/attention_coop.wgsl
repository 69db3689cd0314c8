// Scaled dot-product attention on tensor cores (wgpu's experimental
// cooperative matrices, VK_KHR_cooperative_matrix): f16 q, k, v and output,
// f32 scores, softmax and accumulation. Same bindings, layout and Params as
// attention.wgsl (ops/attention.rs fills one Params for both), one pass over
// all keys (key_start and key_end unused), head dims up to 80:
//
//   @binding(0) p    Params (uniform)
//   @binding(1) q    array<f16> (read): [batch, lq, heads * HEAD_DIM]
//   @binding(2) k    array<f16> (read): [batch, lk, heads * HEAD_DIM]
//   @binding(3) v    array<f16> (read): [batch, lk, heads * HEAD_DIM]
//   @binding(4) out  array<f16> (read_write): [batch, lq, heads * HEAD_DIM]
//
// Dispatch: x = ceil(lq / 64) query blocks, y = heads, z = batch items. A
// workgroup of 4 subgroups of 32 owns 64 queries, 16 per subgroup. It walks
// the keys 32 at a time, twice, instead of rescaling its output on the way
// (an online softmax would scale rows of the accumulators, which
// cooperative matrices cannot do in place):
//   1. S = q kᵀ on tensor cores, staged in workgroup memory, where each
//      pair of lanes keeps the running maximum m of one query row;
//   2. S again, P = exp2(S * scale_log2 - m) (f16 in workgroup memory, the
//      row sums l in f32), O += P v on tensor cores;
// then O / l is stored. The second product of q kᵀ costs less than the
// rescaling would; the scores never leave the workgroup. Head dims are
// zero-padded to a multiple of 16 in the staged tiles, so padded q and k
// columns add nothing and padded v columns are not stored.
//
// The wording of the extension (naga 30): `coopLoadT` / `coopStoreT` are
// row-major, `coopLoad` column-major, strides in elements, and
// coopMultiplyAdd(a, b, c) = a * b + c.

enable f16;
enable wgpu_cooperative_matrix;

struct Params {
    lq: u32,
    lk: u32,
    stride: u32,      // heads * HEAD_DIM: elements between consecutive tokens
    causal: u32,      // 1: query i sees keys j <= i only
    q_off: u32,
    k_off: u32,
    v_off: u32,
    out_off: u32,
    scale_log2: f32,  // scale * log2(e): scores in base 2, so that exp2 applies
    key_start: u32,
    key_end: u32,
    heads: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    _pad3: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f16>;
@group(0) @binding(2) var<storage, read> k: array<f16>;
@group(0) @binding(3) var<storage, read> v: array<f16>;
@group(0) @binding(4) var<storage, read_write> out: array<f16>;

// The head dim of this pipeline, at most 80 (ops/attention.rs routes larger
// ones to the portable kernel).
override HEAD_DIM: u32 = 40u;
// The head dim padded to whole 16-wide fragments.
override D16: u32 = (HEAD_DIM + 15u) / 16u * 16u;

const QUERIES: u32 = 64u;
const KEYS: u32 = 32u;
const SUBGROUP: u32 = 32u;
const INVOCATIONS: u32 = 128u;
const FRAG: u32 = 16u;
// Row stride of the staged q, k and v tiles: the largest D16 (80) plus 8
// halves, which keeps fragments 16-byte aligned and rows in different banks.
const LD: u32 = 88u;
// Row strides of one subgroup's scores (f32) and probabilities (f16): KEYS
// plus 16 bytes, so that the 16 rows a subgroup's lane pairs read at once
// fall in different banks (a stride of exactly 32 words put all 16 in one).
const S_LD: u32 = KEYS + 4u;
const P_LD: u32 = KEYS + 8u;
const SUB_S: u32 = FRAG * S_LD;
const SUB_P: u32 = FRAG * P_LD;

var<workgroup> q_tile: array<f16, 5632>;   // QUERIES x LD
var<workgroup> k_tile: array<f16, 2816>;   // KEYS x LD
var<workgroup> v_tile: array<f16, 2816>;   // KEYS x LD
var<workgroup> s_tile: array<f32, 2304>;   // 4 subgroups x SUB_S
var<workgroup> p_tile: array<f16, 2560>;   // 4 subgroups x SUB_P
var<workgroup> pair: array<f32, 128>;      // one value per invocation, for lane pairs
var<workgroup> zeros: array<f32, 256>;     // one 16 x 16 fragment of zeros

// Stages KEYS rows of k (and of v, when `with_v`) from key kb on, zero past
// lk and past HEAD_DIM: four invocations per row, each every fourth column
// (neighbouring lanes read neighbouring values), in a loop of a constant
// trip count.
fn stage_keys(z: u32, h: u32, kb: u32, lid: u32, with_v: bool) {
    let r = lid / 4u;
    let part = lid % 4u;
    let inside = kb + r < p.lk;
    let g = (z * p.lk + kb + r) * p.stride + h * HEAD_DIM;
    for (var c = 0u; c < D16 / 4u; c++) {
        let d = part + 4u * c;
        var kv = f16(0.0);
        var vv = f16(0.0);
        if (inside && d < HEAD_DIM) {
            kv = k[p.k_off + g + d];
            if (with_v) {
                vv = v[p.v_off + g + d];
            }
        }
        k_tile[r * LD + d] = kv;
        if (with_v) {
            v_tile[r * LD + d] = vv;
        }
    }
}

// This subgroup's 16 x KEYS scores q kᵀ for the staged keys, into its part
// of s_tile (row-major, stride S_LD).
fn scores(sg: u32) {
    var s0 = coopLoadT<coop_mat16x16<f32, C>>(&zeros[0], FRAG);
    var s1 = s0;
    for (var c = 0u; c < D16; c += FRAG) {
        let a = coopLoadT<coop_mat16x16<f16, A>>(&q_tile[sg * FRAG * LD + c], LD);
        // kᵀ: column-major loads of the row-major key rows.
        let b0 = coopLoad<coop_mat16x16<f16, B>>(&k_tile[c], LD);
        let b1 = coopLoad<coop_mat16x16<f16, B>>(&k_tile[FRAG * LD + c], LD);
        s0 = coopMultiplyAdd(a, b0, s0);
        s1 = coopMultiplyAdd(a, b1, s1);
    }
    coopStoreT(s0, &s_tile[sg * SUB_S], S_LD);
    coopStoreT(s1, &s_tile[sg * SUB_S + FRAG], S_LD);
}

// Whether query `qi` sees key `key`.
fn visible(qi: u32, key: u32) -> bool {
    return key < p.lk && (p.causal == 0u || key <= qi);
}

// The other lane of this invocation's pair: both hold half of one row.
fn pair_sum(lid: u32, x: f32) -> f32 {
    pair[lid] = x;
    workgroupBarrier();
    let y = pair[lid ^ 1u];
    workgroupBarrier();
    return x + y;
}

fn pair_max(lid: u32, x: f32) -> f32 {
    pair[lid] = x;
    workgroupBarrier();
    let y = pair[lid ^ 1u];
    workgroupBarrier();
    return max(x, y);
}

// Adds P (16 x KEYS, f16) times the staged v's columns c .. c+15 to `o`.
fn pv(sg: u32, c: u32, o: coop_mat16x16<f32, C>) -> coop_mat16x16<f32, C> {
    let a0 = coopLoadT<coop_mat16x16<f16, A>>(&p_tile[sg * SUB_P], P_LD);
    let a1 = coopLoadT<coop_mat16x16<f16, A>>(&p_tile[sg * SUB_P + FRAG], P_LD);
    let b0 = coopLoadT<coop_mat16x16<f16, B>>(&v_tile[c], LD);
    let b1 = coopLoadT<coop_mat16x16<f16, B>>(&v_tile[FRAG * LD + c], LD);
    return coopMultiplyAdd(a1, b1, coopMultiplyAdd(a0, b0, o));
}

// Writes O's columns c .. c+15 divided by the row sums: each lane of a pair
// stores 8 of its row's 16 values. Called by every subgroup in step.
fn store_out(sg: u32, lane: u32, z: u32, h: u32, qi: u32, l: f32, c: u32, o: coop_mat16x16<f32, C>) {
    coopStoreT(o, &s_tile[sg * SUB_S], S_LD);
    workgroupBarrier();
    let r = lane / 2u;
    let half = lane % 2u;
    if (qi < p.lq) {
        for (var j = 0u; j < 8u; j++) {
            let col = half * 8u + j;
            let d = c + col;
            if (d < HEAD_DIM) {
                let g = (z * p.lq + qi) * p.stride + h * HEAD_DIM + d;
                out[p.out_off + g] = f16(s_tile[sg * SUB_S + r * S_LD + col] / l);
            }
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(128)
fn attention_coop(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let z = wid.z;
    let h = wid.y;
    let q0 = wid.x * QUERIES;
    let sg = lid / SUBGROUP;
    let lane = lid % SUBGROUP;
    // Each pair of lanes owns one query row of its subgroup, half of the
    // KEYS columns each.
    let row = lane / 2u;
    let half = lane % 2u;
    let qi = q0 + sg * FRAG + row;

    for (var e = lid; e < 256u; e += INVOCATIONS) {
        zeros[e] = 0.0;
    }
    // Two invocations per query row, each every other column.
    let q_row = lid / 2u;
    let q_inside = q0 + q_row < p.lq;
    let q_g = p.q_off + (z * p.lq + q0 + q_row) * p.stride + h * HEAD_DIM;
    for (var c = 0u; c < D16 / 2u; c++) {
        let d = lid % 2u + 2u * c;
        var x = f16(0.0);
        if (q_inside && d < HEAD_DIM) {
            x = q[q_g + d];
        }
        q_tile[q_row * LD + d] = x;
    }

    // 1. The row maxima of the scaled scores.
    var m = -3.0e38;
    for (var kb = 0u; kb < p.lk; kb += KEYS) {
        workgroupBarrier();
        stage_keys(z, h, kb, lid, false);
        workgroupBarrier();
        scores(sg);
        workgroupBarrier();
        for (var j = 0u; j < 16u; j++) {
            let col = half * 16u + j;
            if (visible(qi, kb + col)) {
                m = max(m, s_tile[sg * SUB_S + row * S_LD + col] * p.scale_log2);
            }
        }
    }
    m = pair_max(lid, m);

    // 2. P = exp2(S - m), its row sums, and O = P v.
    var o0 = coopLoadT<coop_mat16x16<f32, C>>(&zeros[0], FRAG);
    var o1 = o0;
    var o2 = o0;
    var o3 = o0;
    var o4 = o0;
    var l = 0.0;
    for (var kb = 0u; kb < p.lk; kb += KEYS) {
        workgroupBarrier();
        stage_keys(z, h, kb, lid, true);
        workgroupBarrier();
        scores(sg);
        workgroupBarrier();
        for (var j = 0u; j < 16u; j++) {
            let col = half * 16u + j;
            var e = 0.0;
            if (visible(qi, kb + col)) {
                e = exp2(s_tile[sg * SUB_S + row * S_LD + col] * p.scale_log2 - m);
            }
            l += e;
            p_tile[sg * SUB_P + row * P_LD + col] = f16(e);
        }
        workgroupBarrier();
        o0 = pv(sg, 0u, o0);
        if (D16 > 16u) {
            o1 = pv(sg, 16u, o1);
        }
        if (D16 > 32u) {
            o2 = pv(sg, 32u, o2);
        }
        if (D16 > 48u) {
            o3 = pv(sg, 48u, o3);
        }
        if (D16 > 64u) {
            o4 = pv(sg, 64u, o4);
        }
    }
    l = pair_sum(lid, l);
    workgroupBarrier();

    store_out(sg, lane, z, h, qi, l, 0u, o0);
    if (D16 > 16u) {
        store_out(sg, lane, z, h, qi, l, 16u, o1);
    }
    if (D16 > 32u) {
        store_out(sg, lane, z, h, qi, l, 32u, o2);
    }
    if (D16 > 48u) {
        store_out(sg, lane, z, h, qi, l, 48u, o3);
    }
    if (D16 > 64u) {
        store_out(sg, lane, z, h, qi, l, 64u, o4);
    }
}
