// Fused attention for CPU adapters (lavapipe): same maths, Params, bindings,
// passes and state layout as attention.wgsl, with the dispatch x = query
// blocks of {SLOTS} queries, y = heads, z = batch items; workgroup = 8 lanes.
//
// This file is a template: engine/src/ops/attention.rs expands it once per
// head dim D and slot layout. `//#for NAME in RANGE` ... `//#end` repeats the
// lines between for each value, and {name} is replaced by it:
//   channels  c = 0..D
//   chunks    k = 0..ceil(D/8), c0 = 8k
//   chunk     c = c0..min(c0+8, D) of the enclosing chunk, i = c - c0
//   groups    g = 0..G   (a lane's queries, W per group, in one `slots` vector)
//   slots     r = 0..W, slot = g*W + r
// plus {D}, {SLOTS} (= 8*G*W), {STATE_LEN}, {SLOT_TYPE} and {SLOT_TYPE_U}.
//
// Why it is shaped like this (measured on llvmpipe, Mesa 22.3):
// - Every storage or workgroup-memory load is issued as one scalar load per
//   lane, even when all lanes read the same address, and costs ~10x an
//   arithmetic op. So the 8 lanes load 8 different channels of a key (one
//   load) and pass them around with subgroupBroadcast (a register shuffle),
//   and each lane owns G*W queries, so that each broadcast value feeds G*W
//   multiply-adds: every k/v element is loaded once per 8*G*W queries.
// - Private arrays indexed by a loop variable compile to per-lane memory code
//   (tens of seconds of compile time, several times slower to run), so q and
//   the output accumulators are named registers: that is why the channels are
//   unrolled here rather than looped over.
// - llvmpipe ends all loops of an invocation after 65535 iterations in all;
//   the key loop is the only loop, and the host splits longer key ranges into
//   passes.
// The softmax is online with lazy rescaling: the running max m only moves
// (and the accumulators are rescaled) when a score exceeds it by more than
// 2^RESCALE_ABOVE, so exp2(s - m) stays below 256 and the rescale is rare.

struct Params {
    lq: u32,
    lk: u32,
    stride: u32,
    causal: u32,
    q_off: u32,
    k_off: u32,
    v_off: u32,
    out_off: u32,
    scale_log2: f32,
    key_start: u32,
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

// One value per query of a slot group.
alias slots = {SLOT_TYPE};
alias slots_u = {SLOT_TYPE_U};

// Passes over a long key range (see attention.wgsl): the first one starts
// from nothing, the last one writes the output; the others read and write
// the state. Constants rather than uniforms, so that a single pass compiles
// without the state code (which triples llvmpipe's compile time here).
override FIRST_PASS: bool = true;
override LAST_PASS: bool = true;
const NEG_BIG: f32 = -3.0e38;
const RESCALE_ABOVE: f32 = 8.0;

@compute @workgroup_size(8)
fn attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let b = wid.z;
    let head = wid.y * {D}u;
    let first_query = wid.x * {SLOTS}u;
    let last_query = p.lq - 1u;
    let k_base = p.k_off + b * p.lk * p.stride + head;
    // v rows lie where the k rows do, shifted (u32 wraps: may be "negative").
    let v_shift = p.v_off - p.k_off;
    let state_row = (b * p.heads + wid.y) * p.lq;

    // Slot r of group g holds query first_query + 8*slot + lane; slots past
    // the last query run with it (clamped) and write nothing.
    //#for g in groups
    var end_{g}: slots_u;
    var m_{g} = slots(NEG_BIG);
    var l_{g} = slots(0.0);
    //#for c in channels
    var q_{g}_{c}: slots;
    var o_{g}_{c}: slots;
    //#end
    //#for r in slots
    let query_{g}_{r} = first_query + {slot}u * 8u + lane;
    let qi_{g}_{r} = min(query_{g}_{r}, last_query);
    let q_row_{g}_{r} = p.q_off + (b * p.lq + qi_{g}_{r}) * p.stride + head;
    end_{g}[{r}] = select(p.key_end, min(p.key_end, qi_{g}_{r} + 1u), p.causal != 0u);
    //#for c in channels
    q_{g}_{c}[{r}] = f32(q[q_row_{g}_{r} + {c}u]) * p.scale_log2;
    //#end
    if (!FIRST_PASS) {
        let s = (state_row + qi_{g}_{r}) * {STATE_LEN}u;
        m_{g}[{r}] = state[s];
        l_{g}[{r}] = state[s + 1u];
        //#for c in channels
        o_{g}_{c}[{r}] = state[s + 2u + {c}u];
        //#end
    }
    //#end
    //#end

    // Keys the workgroup walks: uniform, so that every broadcast sees all lanes.
    var wg_end = p.key_end;
    if (p.causal != 0u) {
        wg_end = min(wg_end, first_query + {SLOTS}u);
    }
    for (var j = p.key_start; j < wg_end; j = j + 1u) {
        let row = k_base + j * p.stride;
        //#for g in groups
        var s_{g} = slots(0.0);
        //#end
        //#for k in chunks
        let kv_{k} = select(0.0, f32(k[row + {c0}u + lane]), {c0}u + lane < {D}u);
        //#for c in chunk
        let kc_{c} = subgroupBroadcast(kv_{k}, {i}u);
        //#for g in groups
        s_{g} = s_{g} + q_{g}_{c} * kc_{c};
        //#end
        //#end
        //#end
        var rescale = false;
        //#for g in groups
        s_{g} = select(slots(NEG_BIG), s_{g}, slots_u(j) < end_{g});
        rescale = rescale || any(s_{g} > m_{g} + slots(RESCALE_ABOVE));
        //#end
        if (rescale) {
            //#for g in groups
            let m_new_{g} = max(m_{g}, s_{g});
            let corr_{g} = exp2(m_{g} - m_new_{g});
            m_{g} = m_new_{g};
            l_{g} = l_{g} * corr_{g};
            //#for c in channels
            o_{g}_{c} = o_{g}_{c} * corr_{g};
            //#end
            //#end
        }
        // A masked key weighs 0 even before any key was seen (m = NEG_BIG).
        //#for g in groups
        let w_{g} = select(slots(0.0), exp2(s_{g} - m_{g}), s_{g} > slots(NEG_BIG));
        l_{g} = l_{g} + w_{g};
        //#end
        //#for k in chunks
        let vv_{k} = select(0.0, f32(v[row + v_shift + {c0}u + lane]), {c0}u + lane < {D}u);
        //#for c in chunk
        let vc_{c} = subgroupBroadcast(vv_{k}, {i}u);
        //#for g in groups
        o_{g}_{c} = o_{g}_{c} + w_{g} * vc_{c};
        //#end
        //#end
        //#end
    }

    //#for g in groups
    //#for r in slots
    if (query_{g}_{r} < p.lq) {
        if (LAST_PASS) {
            let o_row = p.out_off + (b * p.lq + query_{g}_{r}) * p.stride + head;
            let inv_l = 1.0 / l_{g}[{r}];
            //#for c in channels
            out[o_row + {c}u] = st(o_{g}_{c}[{r}] * inv_l);
            //#end
        } else {
            let s = (state_row + query_{g}_{r}) * {STATE_LEN}u;
            state[s] = m_{g}[{r}];
            state[s + 1u] = l_{g}[{r}];
            //#for c in channels
            state[s + 2u + {c}u] = o_{g}_{c}[{r}];
            //#end
        }
    }
    //#end
    //#end
}
