// Softmax over the last dim, numerically stable: exp(x - max) / sum(exp(x - max)).
//
// Bindings:
//   @binding(0) p    uniform Params
//   @binding(1) x    array<st> (read): [rows, len], row-major
//   @binding(2) out  array<st> (read_write): same shape
// `x_off` and `out_off` are element offsets of this window inside the bindings.
// One workgroup per row: every invocation keeps a running (max, sum) over its
// strided values (the online softmax of Milakov & Gimelshein), the workgroup
// merges them, and a second pass writes the probabilities. WG is chosen per
// adapter by the host, as for the norms (see norm.wgsl): 8 on CPU adapters.

struct Params {
    rows: u32,
    len: u32,
    x_off: u32,
    out_off: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<st>;
@group(0) @binding(2) var<storage, read_write> out: array<st>;

// Invocations per workgroup (a power of two, at most MAX_WG).
override WG: u32 = 64u;
const MAX_WG: u32 = 256u;
// Stands in for -inf (WGSL has no infinities): below any f32 a row can hold
// that matters, and exp(NEG_BIG - m) is exactly 0 for any real m.
const NEG_BIG: f32 = -3.0e38;

var<workgroup> red_max: array<f32, MAX_WG>;
var<workgroup> red_sum: array<f32, MAX_WG>;

// Merges two (max, sum of exp(x - max)) pairs.
fn merge(m1: f32, s1: f32, m2: f32, s2: f32) -> vec2<f32> {
    let m = max(m1, m2);
    return vec2<f32>(m, s1 * exp(m1 - m) + s2 * exp(m2 - m));
}

@compute @workgroup_size(WG)
fn softmax(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
           @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.rows) {
        return;
    }
    let base_in = p.x_off + row * p.len;
    var m = NEG_BIG;
    var s = 0.0;
    for (var e = lid; e < p.len; e = e + WG) {
        let v = f32(x[base_in + e]);
        let r = merge(m, s, v, 1.0);
        m = r.x;
        s = r.y;
    }
    red_max[lid] = m;
    red_sum[lid] = s;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k = k >> 1u) {
        if (lid < k) {
            let r = merge(red_max[lid], red_sum[lid], red_max[lid + k], red_sum[lid + k]);
            red_max[lid] = r.x;
            red_sum[lid] = r.y;
        }
        workgroupBarrier();
    }
    let row_max = red_max[0];
    let inv_sum = 1.0 / red_sum[0];
    let base_out = p.out_off + row * p.len;
    for (var e = lid; e < p.len; e = e + WG) {
        out[base_out + e] = st(exp(f32(x[base_in + e]) - row_max) * inv_sum);
    }
}
