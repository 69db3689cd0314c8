// Flash attention on tensor cores (wgpu's experimental cooperative matrices,
// VK_KHR_cooperative_matrix), and its portable twin: f16 q, k, v and output,
// f32 scores, softmax and accumulation. Same bindings, layout and Params as
// attention.wgsl (ops/attention.rs fills one Params for all kernels); one
// pass over all keys (key_start and key_end unused):
//
//   @binding(0) p    Params (uniform)
//   @binding(1) q    array<f16> (read): [batch, lq, heads * D]
//   @binding(2) k    array<f16> (read): [batch, lk, heads * D]
//   @binding(3) v    array<f16> (read): [batch, lk, heads * D]
//   @binding(4) out  array<f16> (read_write): [batch, lq, heads * D]
//
// Dispatch: x = ceil(lq / BQ) query blocks, y = heads, z = batch items.
//
// This file is a template: engine/src/ops/attention_coop.rs expands it once
// per variant (fragment F, subgroups SG, key tile BK), head dim D, subgroup
// width LS and flavour. `//#if coop` / `//#if twin` ... `//#end` keep lines of
// one flavour; `//#for NAME in RANGE` ... `//#end` repeats lines, and {name}
// is replaced by its value:
//   key_frags   n = 0..BK/F, n0 = n*F        (fragments across a key tile)
//   dim_frags   j = 0..DP/F, j0 = j*F        (fragments across the head dim)
//   frag_cols   i = 0..F/LPR                 (a lane's columns of a fragment)
//   lane_keys   c = 0..BK/LPR                (a lane's keys of a tile)
//   lane_dims   c = 0..DP/LPR                (twin: a lane's output columns)
//   row_lanes   mask = 1, 2, 4, ... < LPR    (butterfly over a row's lanes)
//
// The algorithm (FlashAttention-2's, in this project's words): a workgroup
// of SG subgroups owns BQ = SG * F queries, F rows per subgroup, staged once
// in workgroup memory (zero-padded to DP, the head dim in whole fragments:
// 40 -> 48 with 16-wide fragments, so padded q and k columns add nothing and
// padded output columns are never stored). It walks the keys BK at a time
// (causal: only up to its last query): each tile of k and v is staged in
// workgroup memory, S = q kᵀ is one subgroup's F x BK product on tensor
// cores, stored to workgroup memory because a fragment's layout across lanes
// is opaque; there LPR = LS / F lanes own one query row, reduce the row's
// maximum with subgroup shuffles and write P = exp2(S * scale_log2 - m) in
// f16, and O += P v runs on tensor cores again. The softmax is online with
// lazy rescaling: the running maximum m of a row moves only when a tile's
// maximum exceeds it by more than 2^RESCALE_ABOVE, so P stays below 256 (f16
// holds it) and the rescale of O — which needs O's fragments stored,
// scaled row by row and loaded again, since a fragment cannot be scaled by
// rows in place — happens only in the rare tiles where some row moved. That
// decision is workgroup-uniform (a flag read with workgroupUniformLoad), as
// the barriers in it require. Keys past lk (the ragged last tile) and, when
// causal, keys after the query are masked to zero probability.
//
// The twin (flavour `twin`) keeps every step — tiles, staging, score tile,
// masking, online softmax, the lazy-rescale flag, P tile, output — and
// computes the two products with scalar loops instead of fragments, each
// lane owning its softmax columns of S and its row's columns of O. It runs
// on any adapter with f16 and subgroups (lavapipe too), where it checks the
// algorithm against the CPU reference.
//
// The wording of the extension (naga 30): `coopLoadT` / `coopStoreT` are
// row-major, `coopLoad` column-major, strides in elements, and
// coopMultiplyAdd(a, b, c) = a * b + c.

//#if coop
enable f16;
enable wgpu_cooperative_matrix;
//#end
//#if twin
enable f16;
//#end

struct Params {
    lq: u32,
    lk: u32,
    stride: u32,      // heads * D: elements between consecutive tokens
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

const D: u32 = {D}u;            // head dim
const DP: u32 = {DP}u;          // head dim in whole fragments
const F: u32 = {F}u;            // fragment rows = columns = depth
const LS: u32 = {LS}u;          // lanes of a subgroup
const SG: u32 = {SG}u;          // subgroups of a workgroup
const BQ: u32 = {BQ}u;          // queries of a workgroup: SG * F
const BK: u32 = {BK}u;          // keys of a tile
const LPR: u32 = {LPR}u;        // lanes per query row in the softmax: LS / F
const INVOCATIONS: u32 = {INVOCATIONS}u;
// Row strides of the staged q, k and v (halves): DP plus 8, which keeps
// fragment rows 16-byte aligned and neighbouring rows in other banks.
const LD: u32 = DP + 8u;
// Row strides of a subgroup's scores (f32) and probabilities (f16): BK
// plus 16 bytes, for the same reason.
const S_LD: u32 = BK + 4u;
const P_LD: u32 = BK + 8u;
const V_OFF: u32 = BK * LD;     // v's rows follow k's in kv_tile
// Lazy rescaling: m moves when a score exceeds it by more than this (log2).
const RESCALE_ABOVE: f32 = 8.0;
// The maximum of a row that has seen no key yet.
const NONE: f32 = -1.0e30;

var<workgroup> q_tile: array<f16, {Q_TILE}>;    // BQ x LD
var<workgroup> kv_tile: array<f16, {KV_TILE}>;  // k: BK x LD, then v: BK x LD
var<workgroup> s_tile: array<f32, {S_TILE}>;    // SG x F x S_LD
var<workgroup> p_tile: array<f16, {P_TILE}>;    // SG x F x P_LD
// 1 when some row's maximum moved in this tile (so O needs rescaling).
var<workgroup> rescale_flag: u32;
//#if coop
var<workgroup> zeros: array<f32, {FF}>;         // one F x F fragment of zeros
//#end

// Stages the block's BQ query rows, zero past lq and past D, four values
// per step, neighbouring invocations on neighbouring values.
fn stage_q(z: u32, h: u32, q0: u32, lid: u32) {
    for (var g = lid; g < BQ * (DP / 4u); g += INVOCATIONS) {
        let r = g / (DP / 4u);
        let c = (g % (DP / 4u)) * 4u;
        let inside = q0 + r < p.lq;
        let src = p.q_off + (z * p.lq + q0 + r) * p.stride + h * D + c;
        for (var e = 0u; e < 4u; e++) {
            var x = f16(0.0);
            if (inside && c + e < D) {
                x = q[src + e];
            }
            q_tile[r * LD + c + e] = x;
        }
    }
}

// Stages the tile of BK keys from kb: k rows, then v rows, zero past lk
// (the ragged last tile) and past D.
fn stage_kv(z: u32, h: u32, kb: u32, lid: u32) {
    for (var g = lid; g < BK * (DP / 4u); g += INVOCATIONS) {
        let r = g / (DP / 4u);
        let c = (g % (DP / 4u)) * 4u;
        let inside = kb + r < p.lk;
        let row = (z * p.lk + kb + r) * p.stride + h * D + c;
        for (var e = 0u; e < 4u; e++) {
            var kx = f16(0.0);
            var vx = f16(0.0);
            if (inside && c + e < D) {
                kx = k[p.k_off + row + e];
                vx = v[p.v_off + row + e];
            }
            kv_tile[r * LD + c + e] = kx;
            kv_tile[V_OFF + r * LD + c + e] = vx;
        }
    }
}

// Whether query `qi` sees key `key`.
fn visible(qi: u32, key: u32) -> bool {
    return key < p.lk && (p.causal == 0u || key <= qi);
}

fn store(z: u32, h: u32, qi: u32, d: u32, x: f32) {
    if (qi < p.lq && d < D) {
        out[p.out_off + (z * p.lq + qi) * p.stride + h * D + d] = f16(x);
    }
}

@compute @workgroup_size({INVOCATIONS})
fn attention_flash(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let z = wid.z;
    let h = wid.y;
    let q0 = wid.x * BQ;
    let sg = lid / LS;
    let lane = lid % LS;
    // LPR neighbouring lanes own one query row of their subgroup's F; lane
    // `part` of them the row's columns part, part + LPR, ...
    let row = lane / LPR;
    let part = lane % LPR;
    let qrow = sg * F + row;
    let qi = q0 + qrow;
    let s_base = sg * F * S_LD;
    let s_row = s_base + row * S_LD;
    let p_base = sg * F * P_LD;
    let p_row = p_base + row * P_LD;
    // Causal: no key after the block's last query.
    let key_end = select(p.lk, min(p.lk, q0 + BQ), p.causal != 0u);

//#if coop
    for (var e = lid; e < F * F; e += INVOCATIONS) {
        zeros[e] = 0.0;
    }
//#end
    stage_q(z, h, q0, lid);
    workgroupBarrier();
//#if coop
//#for j in dim_frags
    var o{j} = coopLoadT<coop_mat{F}x{F}<f32, C>>(&zeros[0], F);
//#end
//#end
//#if twin
//#for c in lane_dims
    var o{c} = 0.0;
//#end
//#end
    var m = NONE;
    var l = 0.0;

    for (var kb = 0u; kb < key_end; kb += BK) {
        // The previous tile's products are done with kv_tile and p_tile.
        workgroupBarrier();
        stage_kv(z, h, kb, lid);
        if (lid == 0u) {
            rescale_flag = 0u;
        }
        workgroupBarrier();

        // S = q kᵀ: this subgroup's F rows x BK keys, into its s_tile rows.
//#if coop
//#for n in key_frags
        var s{n} = coopLoadT<coop_mat{F}x{F}<f32, C>>(&zeros[0], F);
//#end
//#for j in dim_frags
        let qa{j} = coopLoadT<coop_mat{F}x{F}<f16, A>>(&q_tile[sg * F * LD + {j0}u], LD);
//#for n in key_frags
        // kᵀ: a column-major load of the row-major key rows.
        s{n} = coopMultiplyAdd(qa{j}, coopLoad<coop_mat{F}x{F}<f16, B>>(&kv_tile[{n0}u * LD + {j0}u], LD), s{n});
//#end
//#end
//#for n in key_frags
        coopStoreT(s{n}, &s_tile[s_base + {n0}u], S_LD);
//#end
//#end
//#if twin
//#for c in lane_keys
        var s{c} = 0.0;
//#end
        for (var d = 0u; d < DP; d++) {
            let qd = f32(q_tile[qrow * LD + d]);
//#for c in lane_keys
            s{c} += qd * f32(kv_tile[(part + {c}u * LPR) * LD + d]);
//#end
        }
//#for c in lane_keys
        s_tile[s_row + part + {c}u * LPR] = s{c};
//#end
//#end
        workgroupBarrier();

        // Online softmax of the tile: the row maximum over the row's lanes.
        var tile_max = NONE;
//#for c in lane_keys
        let x{c} = s_tile[s_row + part + {c}u * LPR] * p.scale_log2;
        let seen{c} = visible(qi, kb + part + {c}u * LPR);
        if (seen{c}) {
            tile_max = max(tile_max, x{c});
        }
//#end
//#for x in row_lanes
        tile_max = max(tile_max, subgroupShuffleXor(tile_max, {mask}u));
//#end
        var alpha = 1.0;
        if (tile_max > m + RESCALE_ABOVE) {
            // exp2(NONE - x) is 0: a row's first keys scale nothing.
            alpha = exp2(m - tile_max);
            if (m > NONE) {
                rescale_flag = 1u;
            }
            m = tile_max;
        }
        l *= alpha;
//#for c in lane_keys
        var e{c} = 0.0;
        if (seen{c}) {
            e{c} = exp2(x{c} - m);
        }
        l += e{c};
        p_tile[p_row + part + {c}u * LPR] = f16(e{c});
//#end

        // Its barrier also makes every lane's P visible to the products.
        if (workgroupUniformLoad(&rescale_flag) != 0u) {
//#if coop
//#for j in dim_frags
            coopStoreT(o{j}, &s_tile[s_base], S_LD);
            workgroupBarrier();
//#for i in frag_cols
            s_tile[s_row + part + {i}u * LPR] *= alpha;
//#end
            workgroupBarrier();
            o{j} = coopLoadT<coop_mat{F}x{F}<f32, C>>(&s_tile[s_base], S_LD);
            workgroupBarrier();
//#end
//#end
//#if twin
//#for c in lane_dims
            o{c} *= alpha;
//#end
//#end
        }

        // O += P v.
//#if coop
//#for n in key_frags
        let pa{n} = coopLoadT<coop_mat{F}x{F}<f16, A>>(&p_tile[p_base + {n0}u], P_LD);
//#end
//#for j in dim_frags
//#for n in key_frags
        o{j} = coopMultiplyAdd(pa{n}, coopLoadT<coop_mat{F}x{F}<f16, B>>(&kv_tile[V_OFF + {n0}u * LD + {j0}u], LD), o{j});
//#end
//#end
//#end
//#if twin
        for (var t = 0u; t < BK; t++) {
            let pt = f32(p_tile[p_row + t]);
            let vt = V_OFF + t * LD + part;
//#for c in lane_dims
            o{c} += pt * f32(kv_tile[vt + {c}u * LPR]);
//#end
        }
//#end
    }

    // The row sum over the row's lanes, then O / l.
//#for x in row_lanes
    l += subgroupShuffleXor(l, {mask}u);
//#end
//#if coop
//#for j in dim_frags
    workgroupBarrier();
    coopStoreT(o{j}, &s_tile[s_base], S_LD);
    workgroupBarrier();
//#for i in frag_cols
    store(z, h, qi, {j0}u + part + {i}u * LPR, s_tile[s_row + part + {i}u * LPR] / l);
//#end
//#end
//#end
//#if twin
//#for c in lane_dims
    store(z, h, qi, part + {c}u * LPR, o{c} / l);
//#end
//#end
}
