// Normalisation: GroupNorm (PyTorch semantics, optionally pooling the frames
// of a [B*F, C, *spatial] tensor) and LayerNorm over the last dim.
//
// Bindings:
//   @binding(0) p      uniform Params
//   @binding(1) x      array<st> (read): the input, row-major
//   @binding(2) gamma  array<st> (read): [C] (group norm) or [D] (layer norm), bound
//                      whole; any buffer when absent (flags bit 0 clear)
//   @binding(3) beta   array<st> (read): likewise (flags bit 1)
//   @binding(4) out    array<st> (read_write): same shape as x
//   @binding(5) stats  array<f32> (read_write), group norm only: per-chunk
//                      (mean, M2) pairs, [rows, segs * chunks, 2], followed at
//                      `final_off` by per-row (mean, 1/std) pairs, [rows, 2]
// `x_off` and `out_off` are element offsets of this window inside the bindings.
//
// Group norm: a "group row" r = item * groups + g holds the channels
// g*cg .. (g+1)*cg of one item over all its spatial positions (and, for the
// frames variant, over all `segs` = F frames of the item, which lie `seg_stride`
// = C*S elements apart). Its elements form `segs` contiguous segments of
// `len` = cg*S. Three dispatches (two on CPU adapters, where group_stats_rows
// does the first two):
//   group_stats     one workgroup per `chunk_len` elements of a segment:
//                   moments of the chunk
//   group_finalize  one invocation per group row: combines the chunks, then
//                   mean and 1/sqrt(var + eps)
//   group_apply     one workgroup per `apply_len` of one channel's S values:
//                   (x - mean) * rstd * gamma + beta, optionally SiLU
// Layer norm: one workgroup per row of `len` = D values.
//
// Statistics: each invocation runs Welford's update over its values (one read
// each), and the workgroup and the chunks are combined with Chan et al.'s
// pairwise formula; both stay exact in f32 whatever the data's offset, unlike
// sum / sum-of-squares, which cancels when |mean| >> std.
//
// WG (invocations per workgroup) is chosen by the host per adapter: on a CPU
// adapter (llvmpipe) a workgroup is run as SIMD batches of 8 invocations
// switched at every barrier, so WG = 8 makes barriers nearly free and keeps
// whole rows in one batch; GPUs use wide workgroups.

struct Params {
    rows: u32,          // group rows (group norm) or rows (layer norm) in this window
    x_off: u32,
    out_off: u32,
    eps: f32,
    flags: u32,         // bit 0: gamma present, bit 1: beta present
    len: u32,           // group norm: seg_len = cg * S; layer norm: D
    segs: u32,          // segments per group row (frames; 1 for plain group norm)
    seg_stride: u32,    // elements between the segments of a group row (C * S)
    chunks: u32,        // statistics chunks per segment
    groups: u32,
    channels: u32,
    cg: u32,            // channels per group
    spatial: u32,       // S
    apply_chunks: u32,  // group_apply workgroups per channel row of S values
    channel_rows: u32,  // rows of S values in this window: items * segs * C
    final_off: u32,     // where the per-row (mean, rstd) pairs start in `stats`
    chunk_len: u32,     // elements per group_stats workgroup
    apply_len: u32,     // elements per group_apply workgroup
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<st>;
@group(0) @binding(2) var<storage, read> gamma: array<st>;
@group(0) @binding(3) var<storage, read> beta: array<st>;
@group(0) @binding(4) var<storage, read_write> out: array<st>;
@group(0) @binding(5) var<storage, read_write> stats: array<f32>;

// Invocations per workgroup (a power of two, at most MAX_WG).
override WG: u32 = 256u;
const MAX_WG: u32 = 256u;
const FINALIZE_WG: u32 = 64u;

// Fused SiLU after the affine (diffusers' ResnetBlock2D: norm then SiLU).
override SILU: bool = false;

struct Moments {
    n: f32,
    mean: f32,
    m2: f32,
}

// Chan, Golub & LeVeque's pairwise update of two partial sets' moments.
fn combine(a: Moments, b: Moments) -> Moments {
    let n = a.n + b.n;
    if (n == 0.0) {
        return a;
    }
    let delta = b.mean - a.mean;
    let wb = b.n / n;
    return Moments(n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb);
}

var<workgroup> red_n: array<f32, MAX_WG>;
var<workgroup> red_mean: array<f32, MAX_WG>;
var<workgroup> red_m2: array<f32, MAX_WG>;

// Combines every invocation's moments; all invocations get the total.
fn reduce_moments(lid: u32, m: Moments) -> Moments {
    red_n[lid] = m.n;
    red_mean[lid] = m.mean;
    red_m2[lid] = m.m2;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            let c = combine(Moments(red_n[lid], red_mean[lid], red_m2[lid]),
                            Moments(red_n[lid + s], red_mean[lid + s], red_m2[lid + s]));
            red_n[lid] = c.n;
            red_mean[lid] = c.mean;
            red_m2[lid] = c.m2;
        }
        workgroupBarrier();
    }
    return Moments(red_n[0], red_mean[0], red_m2[0]);
}

// Moments of x[start + lid + k*WG] for k*WG + lid < n (Welford's update).
fn local_moments(start: u32, n: u32, lid: u32) -> Moments {
    var m = Moments(0.0, 0.0, 0.0);
    for (var e = lid; e < n; e = e + WG) {
        let v = f32(x[start + e]);
        m.n = m.n + 1.0;
        let d = v - m.mean;
        m.mean = m.mean + d / m.n;
        m.m2 = m.m2 + d * (v - m.mean);
    }
    return m;
}

fn silu(v: f32) -> f32 {
    return v / (1.0 + exp(-v));
}

// First element of group row r, relative to the window.
fn group_row_base(r: u32) -> u32 {
    let item = r / p.groups;
    let g = r - item * p.groups;
    return item * p.segs * p.seg_stride + g * p.len;
}

// Values in chunk `chunk` of a segment (the last one may be short).
fn chunk_values(chunk: u32) -> u32 {
    return min(p.chunk_len, p.len - chunk * p.chunk_len);
}

// Moments of chunk q of group row r (segment q / chunks, chunk q % chunks);
// every invocation gets them.
fn chunk_moments(r: u32, q: u32, lid: u32) -> Moments {
    let seg = q / p.chunks;
    let chunk = q - seg * p.chunks;
    let start = p.x_off + group_row_base(r) + seg * p.seg_stride + chunk * p.chunk_len;
    return reduce_moments(lid, local_moments(start, chunk_values(chunk), lid));
}

// Row r's mean and 1/std from its combined moments. PyTorch normalises with
// the biased (population) variance.
fn write_row_stats(r: u32, acc: Moments) {
    stats[p.final_off + 2u * r] = acc.mean;
    stats[p.final_off + 2u * r + 1u] = inverseSqrt(acc.m2 / acc.n + p.eps);
}

@compute @workgroup_size(WG)
fn group_stats(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let w = wid.x + wid.y * nwg.x;
    let per_row = p.segs * p.chunks;
    if (w >= p.rows * per_row) {
        return;
    }
    let r = w / per_row;
    let total = chunk_moments(r, w - r * per_row, lid);
    if (lid == 0u) {
        stats[2u * w] = total.mean;
        stats[2u * w + 1u] = total.m2;
    }
}

@compute @workgroup_size(FINALIZE_WG)
fn group_finalize(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = gid.x + gid.y * nwg.x * FINALIZE_WG;
    if (r >= p.rows) {
        return;
    }
    let per_row = p.segs * p.chunks;
    var acc = Moments(0.0, 0.0, 0.0);
    for (var q = 0u; q < per_row; q = q + 1u) {
        let i = 2u * (r * per_row + q);
        acc = combine(acc, Moments(f32(chunk_values(q % p.chunks)), stats[i], stats[i + 1u]));
    }
    write_row_stats(r, acc);
}

// group_stats and group_finalize in one dispatch, a workgroup per group row
// (CPU adapters, where a few dozen workgroups keep every thread busy and a
// dispatch costs tens of microseconds): the row's chunks in group_finalize's
// order, each reduced as group_stats reduces it and combined as
// group_finalize combines them, so the statistics are the same bit for bit.
@compute @workgroup_size(WG)
fn group_stats_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
                    @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = wid.x + wid.y * nwg.x;
    if (r >= p.rows) {
        return;
    }
    let per_row = p.segs * p.chunks;
    var acc = Moments(0.0, 0.0, 0.0);
    for (var q = 0u; q < per_row; q = q + 1u) {
        let total = chunk_moments(r, q, lid);
        acc = combine(acc, Moments(f32(chunk_values(q % p.chunks)), total.mean, total.m2));
        // The next chunk's reduction overwrites what this one read.
        workgroupBarrier();
    }
    if (lid == 0u) {
        write_row_stats(r, acc);
    }
}

// The affine map of channel row cr: v -> (v - mean) * scale + shift.
struct Coeffs {
    mean: f32,
    scale: f32,
    shift: f32,
}

fn channel_coeffs(cr: u32) -> Coeffs {
    let row_of_item = cr / p.channels;
    let c = cr - row_of_item * p.channels;
    let item = row_of_item / p.segs;
    let r = item * p.groups + c / p.cg;
    let mean = stats[p.final_off + 2u * r];
    var scale = stats[p.final_off + 2u * r + 1u];
    var shift = 0.0;
    if ((p.flags & 1u) != 0u) {
        scale = scale * f32(gamma[c]);
    }
    if ((p.flags & 2u) != 0u) {
        shift = f32(beta[c]);
    }
    return Coeffs(mean, scale, shift);
}

fn apply_one(v: f32, k: Coeffs) -> f32 {
    var r = (v - k.mean) * k.scale + k.shift;
    if (SILU) {
        r = silu(r);
    }
    return r;
}

@compute @workgroup_size(WG)
fn group_apply(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let w = wid.x + wid.y * nwg.x;
    let cr = w / p.apply_chunks;
    if (cr >= p.channel_rows) {
        return;
    }
    let chunk = w - cr * p.apply_chunks;
    let k = channel_coeffs(cr);
    let first = chunk * p.apply_len;
    let n = min(p.apply_len, p.spatial - first);
    let base = cr * p.spatial + first;
    for (var e = lid; e < n; e = e + WG) {
        out[p.out_off + base + e] = st(apply_one(f32(x[p.x_off + base + e]), k));
    }
}

// group_apply moving vec4s (x4, out4: see layer_norm_rows4), where S and the
// offsets hold whole vectors; the same arithmetic per element, so the same
// results bit for bit.
@compute @workgroup_size(WG)
fn group_apply4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let w = wid.x + wid.y * nwg.x;
    let cr = w / p.apply_chunks;
    if (cr >= p.channel_rows) {
        return;
    }
    let chunk = w - cr * p.apply_chunks;
    let k = channel_coeffs(cr);
    let first = chunk * p.apply_len;
    let n4 = min(p.apply_len, p.spatial - first) / 4u;
    let xb = (p.x_off + cr * p.spatial + first) / 4u;
    let ob = (p.out_off + cr * p.spatial + first) / 4u;
    for (var e = lid; e < n4; e = e + WG) {
        let v = vec4<f32>(x4[xb + e]);
        out4[ob + e] = st4(vec4<f32>(apply_one(v.x, k), apply_one(v.y, k), apply_one(v.z, k), apply_one(v.w, k)));
    }
}

@compute @workgroup_size(WG)
fn layer_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.rows) {
        return;
    }
    let d = p.len;
    let total = reduce_moments(lid, local_moments(p.x_off + row * d, d, lid));
    let mean = total.mean;
    let rstd = inverseSqrt(total.m2 / f32(d) + p.eps);
    for (var e = lid; e < d; e = e + WG) {
        var v = (f32(x[p.x_off + row * d + e]) - mean) * rstd;
        if ((p.flags & 1u) != 0u) {
            v = v * f32(gamma[e]);
        }
        if ((p.flags & 2u) != 0u) {
            v = v + f32(beta[e]);
        }
        out[p.out_off + row * d + e] = st(v);
    }
}

// Layer norm on CPU adapters, rows of D = `len` values with D a multiple of 4
// and the offsets too: one invocation per row, no workgroup memory, no
// barriers. With the narrow kernel a row of a few hundred values cost a
// workgroup of 8 lanes with a tree reduction, for a few dozen values per lane;
// here 8 lanes are 8 rows, and every access moves a vec4 (on llvmpipe an
// access costs about the same whatever its width). The statistics are the
// narrow kernel's to the bit (below), so D must be a multiple of 8.
//   @binding(1) x4      x as array<st4>
//   @binding(2) gamma4  gamma as array<st4>
//   @binding(3) beta4   beta as array<st4>
//   @binding(4) out4    out as array<st4>
@group(0) @binding(1) var<storage, read> x4: array<st4>;
@group(0) @binding(2) var<storage, read> gamma4: array<st4>;
@group(0) @binding(3) var<storage, read> beta4: array<st4>;
@group(0) @binding(4) var<storage, read_write> out4: array<st4>;

@compute @workgroup_size(WG)
fn layer_norm_rows4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
                    @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = (wid.x + wid.y * nwg.x) * WG + lid;
    if (row >= p.rows) {
        return;
    }
    let d4 = p.len / 4u;
    let xs = p.x_off / 4u + row * d4;
    let os = p.out_off / 4u + row * d4;
    // The statistics exactly as the narrow kernel's 8 lanes compute them, so
    // that a clip does not change by a bit with the kernel: lane l updates
    // Welford's moments over the values l, l + 8, l + 16, … (lanes 0-3 are
    // the components of the even vectors, lanes 4-7 of the odd ones; `len`
    // is a multiple of 8, so every lane holds as many values), then the lanes
    // are combined in the workgroup's tree: l with l + 4, then l + 2, then
    // l + 1. Componentwise, each step is `local_moments`'s and `combine`'s
    // arithmetic in the same order.
    var n = 0.0;
    var mean_a = vec4<f32>(0.0);
    var m2_a = vec4<f32>(0.0);
    var mean_b = vec4<f32>(0.0);
    var m2_b = vec4<f32>(0.0);
    for (var e = 0u; e < d4; e = e + 2u) {
        n = n + 1.0;
        let va = vec4<f32>(x4[xs + e]);
        let da = va - mean_a;
        mean_a = mean_a + da / n;
        m2_a = m2_a + da * (va - mean_a);
        let vb = vec4<f32>(x4[xs + e + 1u]);
        let db = vb - mean_b;
        mean_b = mean_b + db / n;
        m2_b = m2_b + db * (vb - mean_b);
    }
    // Lanes l and l + 4 (equal counts n).
    let n4 = n + n;
    let delta4 = mean_b - mean_a;
    let w4 = n / n4;
    let mean4 = mean_a + delta4 * w4;
    let m24 = m2_a + m2_b + delta4 * delta4 * n * w4;
    // Lanes l and l + 2.
    let n2 = n4 + n4;
    let delta2 = mean4.zw - mean4.xy;
    let w2 = n4 / n2;
    let mean2 = mean4.xy + delta2 * w2;
    let m22 = m24.xy + m24.zw + delta2 * delta2 * n4 * w2;
    // Lanes 0 and 1.
    let n1 = n2 + n2;
    let delta1 = mean2.y - mean2.x;
    let w1 = n2 / n1;
    let mean = mean2.x + delta1 * w1;
    let m2 = m22.x + m22.y + delta1 * delta1 * n2 * w1;
    let rstd = inverseSqrt(m2 / f32(p.len) + p.eps);
    for (var e = 0u; e < d4; e = e + 1u) {
        var v = (vec4<f32>(x4[xs + e]) - mean) * rstd;
        if ((p.flags & 1u) != 0u) {
            v = v * vec4<f32>(gamma4[e]);
        }
        if ((p.flags & 2u) != 0u) {
            v = v + vec4<f32>(beta4[e]);
        }
        out4[os + e] = st4(v);
    }
}

// Channel RMS norm (diffusers' WanRMS_norm, the Wan VAE's norm): for every
// position of x [N, C, *spatial], x / max(‖x[n, :, s]‖₂, eps) · √C · gamma[c]
// + beta[c] (F.normalize over dim 1), optionally SiLU. Two dispatches per
// window of whole items (or, for an item larger than one binding, of a block
// of its channels):
//   channel_sumsq  one invocation per position: Σ_c x² over the window's
//                  channels, into stats[item * S + s] (added to what is there
//                  when flags bit 2 is set: a later channel block)
//   channel_rms_apply  one invocation per element of the window
// Params as used here: rows = items in the window, len = C (all channels, for
// √C), channels = channels in the window, spatial = S, seg_stride = elements
// between items (C·S), final_off = first channel of the window (gamma/beta
// index), eps = F.normalize's 1e-12 floor on the norm; stats is f32 [rows · S].
const RMS_WG: u32 = 64u;

@compute @workgroup_size(RMS_WG)
fn channel_sumsq(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * RMS_WG;
    if (i >= p.rows * p.spatial) {
        return;
    }
    let item = i / p.spatial;
    let s = i - item * p.spatial;
    let base = p.x_off + item * p.seg_stride + s;
    var sum = 0.0;
    for (var c = 0u; c < p.channels; c = c + 1u) {
        let v = f32(x[base + c * p.spatial]);
        sum = sum + v * v;
    }
    if ((p.flags & 4u) != 0u) {
        sum = sum + stats[i];
    }
    stats[i] = sum;
}

@compute @workgroup_size(RMS_WG)
fn channel_rms_apply(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = gid.x + gid.y * nwg.x * RMS_WG;
    let per_item = p.channels * p.spatial;
    if (e >= p.rows * per_item) {
        return;
    }
    let item = e / per_item;
    let rem = e - item * per_item;
    let c = rem / p.spatial;
    let s = rem - c * p.spatial;
    let offset = item * p.seg_stride + rem;
    // PyTorch's order: x / max(norm, eps), then · √C, then · gamma, + beta.
    var v = f32(x[p.x_off + offset]) / max(sqrt(stats[item * p.spatial + s]), p.eps);
    v = v * sqrt(f32(p.len));
    if ((p.flags & 1u) != 0u) {
        v = v * f32(gamma[p.final_off + c]);
    }
    if ((p.flags & 2u) != 0u) {
        v = v + f32(beta[p.final_off + c]);
    }
    if (SILU) {
        v = silu(v);
    }
    out[p.out_off + offset] = st(v);
}


// RMSNorm over the last dim (T5/UMT5's T5LayerNorm, torch.nn.RMSNorm):
// out = x / sqrt(mean(x²) + eps) · gamma, no mean subtracted, no bias. One
// workgroup per row of `len` = D values; the sum of squares is accumulated
// in f32 (transformers upcasts to f32 for it) and reduced as a tree.
@compute @workgroup_size(WG)
fn rms_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
            @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.rows) {
        return;
    }
    let d = p.len;
    let base = row * d;
    var squares = 0.0;
    for (var e = lid; e < d; e = e + WG) {
        let v = f32(x[p.x_off + base + e]);
        squares = squares + v * v;
    }
    red_m2[lid] = squares;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            red_m2[lid] = red_m2[lid] + red_m2[lid + s];
        }
        workgroupBarrier();
    }
    let rstd = inverseSqrt(red_m2[0] / f32(d) + p.eps);
    for (var e = lid; e < d; e = e + WG) {
        var v = f32(x[p.x_off + base + e]) * rstd;
        if ((p.flags & 1u) != 0u) {
            v = v * f32(gamma[e]);
        }
        out[p.out_off + base + e] = st(v);
    }
}
