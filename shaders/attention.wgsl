// Fused scaled dot-product attention with an online softmax (flash-attention
// style): out = softmax(scale * q k^T [+ causal mask]) v, per head, without
// ever storing the [Lq, Lk] scores. Memory is O(L), not O(L^2).
//
// Bindings:
//   @binding(0) p      uniform Params
//   @binding(1) q      array<st> (read): [batch, lq, heads * HEAD_DIM]
//   @binding(2) k      array<st> (read): [batch, lk, heads * HEAD_DIM]
//   @binding(3) v      array<st> (read): [batch, lk, heads * HEAD_DIM]
//   @binding(4) out    array<st> (read_write): [batch, lq, heads * HEAD_DIM]
//   @binding(5) state  array<f32> (read_write): [batch, heads, lq, 2 + 4 * D4]
//                      per query (m, l, acc) between passes; unused (any
//                      buffer) when one pass covers all keys
// Head h uses channels h*HEAD_DIM .. (h+1)*HEAD_DIM of every token (the layout
// linear projections produce, so no head split/merge permutes are needed).
// `*_off` are element offsets of this window of batch items in q, k, v, out.
//
// Dispatch: x = ceil(lq / WG_Q) query blocks, y = heads, z = batch items.
// Each invocation owns one query row: its scaled q and its output accumulators
// live in private vec4 arrays. The workgroup stages 8 keys of k and v at a time
// in workgroup memory (each loaded once for all WG_Q queries), and every
// invocation walks them keeping the running max m and sum l of
// exp2(score - m), rescaling its accumulators once per 8 keys. Key loops have
// a workgroup-uniform trip count (the causal mask is applied per query).
// Long key ranges may be split by the host into passes over
// [key_start, key_end) that carry (m, l, acc) in `state` (FIRST_PASS starts
// from nothing, LAST_PASS writes the output): llvmpipe ends all loops of an
// invocation after 65535 iterations in all. (CPU adapters run attention_subgroup.wgsl.)

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
    key_start: u32,   // keys of this pass
    key_end: u32,
    heads: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    _pad3: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<st>;
@group(0) @binding(2) var<storage, read> k: array<st>;
@group(0) @binding(3) var<storage, read> v: array<st>;
@group(0) @binding(4) var<storage, read_write> out: array<st>;
@group(0) @binding(5) var<storage, read_write> state: array<f32>;

// The head dim of this pipeline (SD: 40, 80, 160; CLIP: 64).
override HEAD_DIM: u32 = 64u;
// Queries (invocations) per workgroup.
override WG_Q: u32 = 64u;
override FIRST_PASS: bool = true;
override LAST_PASS: bool = true;
// vec4 slots of the private arrays: the largest head dim in SD 1.5 is 160.
const MAX_D4: u32 = 40u;
// Keys per tile: k and v tiles take 2 * 8 * 160 * 4 bytes = 10 KiB, within
// WebGPU's 16 KiB minimum of workgroup memory.
const TILE_KEYS: u32 = 8u;
// Stands in for -inf (WGSL has no infinities): exp2(NEG_BIG - m) is exactly 0.
const NEG_BIG: f32 = -3.0e38;

var<workgroup> k_tile: array<st4, TILE_KEYS * MAX_D4>;
var<workgroup> v_tile: array<st4, TILE_KEYS * MAX_D4>;

fn d4_count() -> u32 {
    return (HEAD_DIM + 3u) / 4u;
}

// Channels 4*d4 .. 4*d4+3 of a head starting at element `base`; channels past
// HEAD_DIM read as 0 (select, so that whatever lies there, even a NaN
// pattern, never enters the sums).
fn q4(base: u32, d4: u32) -> vec4<f32> {
    let i = base + 4u * d4;
    let c = 4u * d4;
    if (HEAD_DIM % 4u == 0u) {
        return vec4<f32>(f32(q[i]), f32(q[i + 1u]), f32(q[i + 2u]), f32(q[i + 3u]));
    }
    return vec4<f32>(f32(q[i]), select(0.0, f32(q[i + 1u]), c + 1u < HEAD_DIM),
                     select(0.0, f32(q[i + 2u]), c + 2u < HEAD_DIM), select(0.0, f32(q[i + 3u]), c + 3u < HEAD_DIM));
}

fn k4(base: u32, d4: u32) -> vec4<f32> {
    let i = base + 4u * d4;
    let c = 4u * d4;
    if (HEAD_DIM % 4u == 0u) {
        return vec4<f32>(f32(k[i]), f32(k[i + 1u]), f32(k[i + 2u]), f32(k[i + 3u]));
    }
    return vec4<f32>(f32(k[i]), select(0.0, f32(k[i + 1u]), c + 1u < HEAD_DIM),
                     select(0.0, f32(k[i + 2u]), c + 2u < HEAD_DIM), select(0.0, f32(k[i + 3u]), c + 3u < HEAD_DIM));
}

fn v4(base: u32, d4: u32) -> vec4<f32> {
    let i = base + 4u * d4;
    let c = 4u * d4;
    if (HEAD_DIM % 4u == 0u) {
        return vec4<f32>(f32(v[i]), f32(v[i + 1u]), f32(v[i + 2u]), f32(v[i + 3u]));
    }
    return vec4<f32>(f32(v[i]), select(0.0, f32(v[i + 1u]), c + 1u < HEAD_DIM),
                     select(0.0, f32(v[i + 2u]), c + 2u < HEAD_DIM), select(0.0, f32(v[i + 3u]), c + 3u < HEAD_DIM));
}

fn key(t: u32, d4: u32) -> vec4<f32> {
    return vec4<f32>(k_tile[t * MAX_D4 + d4]);
}

fn value(t: u32, d4: u32) -> vec4<f32> {
    return vec4<f32>(v_tile[t * MAX_D4 + d4]);
}

@compute @workgroup_size(WG_Q)
fn attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = wid.x * WG_Q + lid;
    // Invocations past the last query run with it (they may have to load
    // tiles and meet barriers) and write nothing.
    let in_range = i < p.lq;
    let qi = min(i, p.lq - 1u);
    let h = wid.y;
    let b = wid.z;
    let d4n = d4_count();
    let head = h * HEAD_DIM;
    let q_base = p.q_off + (b * p.lq + qi) * p.stride + head;
    let k_base = p.k_off + b * p.lk * p.stride + head;
    let v_base = p.v_off + b * p.lk * p.stride + head;
    let state_base = ((b * p.heads + h) * p.lq + qi) * (2u + 4u * d4n);

    var qs: array<vec4<f32>, MAX_D4>;
    for (var d4 = 0u; d4 < d4n; d4 = d4 + 1u) {
        qs[d4] = q4(q_base, d4) * p.scale_log2;
    }
    var acc: array<vec4<f32>, MAX_D4>;
    var m = NEG_BIG;
    var l = 0.0;
    if (!FIRST_PASS) {
        m = state[state_base];
        l = state[state_base + 1u];
        for (var d4 = 0u; d4 < d4n; d4 = d4 + 1u) {
            let s = state_base + 2u + 4u * d4;
            acc[d4] = vec4<f32>(state[s], state[s + 1u], state[s + 2u], state[s + 3u]);
        }
    }

    // Keys the workgroup walks (uniform) and keys this query sees.
    var wg_end = p.key_end;
    var lane_end = p.key_end;
    if (p.causal != 0u) {
        wg_end = min(wg_end, (wid.x + 1u) * WG_Q);
        lane_end = min(lane_end, qi + 1u);
    }
    let last_key = p.lk - 1u;
    for (var j0 = p.key_start; j0 < wg_end; j0 = j0 + TILE_KEYS) {
        workgroupBarrier();
        // Keys past the end are clamped to the last one and masked below.
        for (var e = lid; e < TILE_KEYS * d4n; e = e + WG_Q) {
            let t = e / d4n;
            let d4 = e - t * d4n;
            let row = min(j0 + t, last_key) * p.stride;
            k_tile[t * MAX_D4 + d4] = st4(k4(k_base + row, d4));
            v_tile[t * MAX_D4 + d4] = st4(v4(v_base + row, d4));
        }
        workgroupBarrier();
        var sa = vec4<f32>(0.0);
        var sb = vec4<f32>(0.0);
        for (var d4 = 0u; d4 < d4n; d4 = d4 + 1u) {
            let qv = qs[d4];
            sa = sa + vec4<f32>(dot(qv, key(0u, d4)), dot(qv, key(1u, d4)), dot(qv, key(2u, d4)), dot(qv, key(3u, d4)));
            sb = sb + vec4<f32>(dot(qv, key(4u, d4)), dot(qv, key(5u, d4)), dot(qv, key(6u, d4)), dot(qv, key(7u, d4)));
        }
        let ja = vec4<u32>(j0) + vec4<u32>(0u, 1u, 2u, 3u);
        let jb = ja + vec4<u32>(4u);
        let end = vec4<u32>(min(lane_end, wg_end));
        sa = select(vec4<f32>(NEG_BIG), sa, ja < end);
        sb = select(vec4<f32>(NEG_BIG), sb, jb < end);
        let block_max = max(max(max(sa.x, sa.y), max(sa.z, sa.w)), max(max(sb.x, sb.y), max(sb.z, sb.w)));
        let m_new = max(m, block_max);
        let corr = exp2(m - m_new);
        // A masked key weighs 0 even before any key was seen (m = NEG_BIG).
        let pa = select(vec4<f32>(0.0), exp2(sa - vec4<f32>(m_new)), sa > vec4<f32>(NEG_BIG));
        let pb = select(vec4<f32>(0.0), exp2(sb - vec4<f32>(m_new)), sb > vec4<f32>(NEG_BIG));
        l = l * corr + dot(pa, vec4<f32>(1.0)) + dot(pb, vec4<f32>(1.0));
        m = m_new;
        for (var d4 = 0u; d4 < d4n; d4 = d4 + 1u) {
            acc[d4] = acc[d4] * corr
                + pa.x * value(0u, d4) + pa.y * value(1u, d4) + pa.z * value(2u, d4) + pa.w * value(3u, d4)
                + pb.x * value(4u, d4) + pb.y * value(5u, d4) + pb.z * value(6u, d4) + pb.w * value(7u, d4);
        }
    }

    if (!in_range) {
        return;
    }
    if (!LAST_PASS) {
        state[state_base] = m;
        state[state_base + 1u] = l;
        for (var d4 = 0u; d4 < d4n; d4 = d4 + 1u) {
            let s = state_base + 2u + 4u * d4;
            state[s] = acc[d4].x;
            state[s + 1u] = acc[d4].y;
            state[s + 2u] = acc[d4].z;
            state[s + 3u] = acc[d4].w;
        }
        return;
    }
    let inv_l = 1.0 / l;
    let o_base = p.out_off + (b * p.lq + i) * p.stride + head;
    for (var d = 0u; d < HEAD_DIM; d = d + 1u) {
        out[o_base + d] = st(acc[d / 4u][d % 4u] * inv_l);
    }
}
