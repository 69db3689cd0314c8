// Data movement: general permute, copy into a channel slice (concat), and
// nearest upsampling to an exact size.
//
// Bindings (every entry):
//   @binding(0) p    uniform Params
//   @binding(1) src  array<st> (read)
//   @binding(2) dst  array<st> (write)
// `src_off`/`dst_off` are element offsets inside the (aligned) bindings.
// Dispatch: 1-D over `n` outputs, spread over x and y.

struct Params {
    n: u32,
    src_off: u32,
    dst_off: u32,
    rank: u32,
    // permute: out shape (innermost last) and the input stride of each out dim.
    // copy_into: a = [cs, inner, ct, c0] (src channels, inner size, dst channels, channel offset).
    // copy_from: a = [cs, inner, ct, c0] (src channels, inner size, dst channels, first src channel).
    // upsample: a = [in_h, in_w, out_h, out_w].
    a: array<vec4<u32>, 2>,
    b: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<st>;
@group(0) @binding(2) var<storage, read_write> dst: array<st>;

const WG: u32 = 256u;

fn linear_index(wid: vec3<u32>, lid: u32, nwg: vec3<u32>) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

// permute's source index of output i: sum_d coord_d(i) * stride_d.
fn permuted_index(i: u32) -> u32 {
    var rem = i;
    var s = 0u;
    for (var d = i32(p.rank) - 1; d >= 0; d = d - 1) {
        let dim = p.a[d / 4][d % 4];
        s = s + (rem % dim) * p.b[d / 4][d % 4];
        rem = rem / dim;
    }
    return s;
}

// dst[i] = src[permuted_index(i)]: one output element per invocation,
// so writes are contiguous and reads gather.
@compute @workgroup_size(WG)
fn permute(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
           @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(wid, lid, nwg);
    if (i >= p.n) { return; }
    let s = permuted_index(i);
    dst[p.dst_off + i] = src[p.src_off + s];
}

// permute4: the same, 4 neighbouring outputs of the innermost output dim per
// invocation (its size a multiple of 4, dst_off and n too), written as one
// vec4 (dst4, the same window as dst) and read as one vec4 (src4) where the
// innermost dim is contiguous in the input and aligned. The coordinates take
// divisions by the dims, each 8 scalar divisions on a CPU adapter (no vector
// integer division there), and every storage access there is a loop over
// the lanes: both now come once per 4 outputs.
//   @binding(3) dst4  array<st4> (write)
//   @binding(4) src4  array<st4> (read)
@group(0) @binding(3) var<storage, read_write> dst4: array<st4>;
@group(0) @binding(4) var<storage, read> src4: array<st4>;

@compute @workgroup_size(WG)
fn permute4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
            @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = 4u * linear_index(wid, lid, nwg);
    if (i >= p.n) { return; }
    let s = permuted_index(i);
    let last = p.rank - 1u;
    let step = p.b[last / 4u][last % 4u];
    let at = p.src_off + s;
    var v: st4;
    if (step == 1u && (at & 3u) == 0u) {
        v = src4[at / 4u];
    } else {
        v = st4(src[at], src[at + step], src[at + 2u * step], src[at + 3u * step]);
    }
    dst4[(p.dst_off + i) / 4u] = v;
}

// src [outer, cs, inner] into dst [outer, ct, inner] at channels c0..c0+cs.
@compute @workgroup_size(WG)
fn copy_into(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
             @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(wid, lid, nwg);
    if (i >= p.n) { return; }
    let cs = p.a[0].x;
    let inner = p.a[0].y;
    let ct = p.a[0].z;
    let c0 = p.a[0].w;
    let row = cs * inner;
    let o = i / row;
    let r = i - o * row;
    dst[p.dst_off + o * ct * inner + c0 * inner + r] = src[p.src_off + i];
}

// dst [outer, ct, inner] = channels c0..c0+ct of src [outer, cs, inner] (narrow).
@compute @workgroup_size(WG)
fn copy_from(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
             @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(wid, lid, nwg);
    if (i >= p.n) { return; }
    let cs = p.a[0].x;
    let inner = p.a[0].y;
    let ct = p.a[0].z;
    let c0 = p.a[0].w;
    let row = ct * inner;
    let o = i / row;
    let r = i - o * row;
    dst[p.dst_off + i] = src[p.src_off + o * cs * inner + c0 * inner + r];
}

// Nearest upsampling of [planes, in_h, in_w] to [planes, out_h, out_w] with
// src = floor(dst * in / out), PyTorch's `nearest` for an exact output size.
@compute @workgroup_size(WG)
fn upsample_nearest(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
                    @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(wid, lid, nwg);
    if (i >= p.n) { return; }
    let in_h = p.a[0].x;
    let in_w = p.a[0].y;
    let out_h = p.a[0].z;
    let out_w = p.a[0].w;
    let plane = i / (out_h * out_w);
    let r = i - plane * out_h * out_w;
    let y = r / out_w;
    let x = r - y * out_w;
    let sy = (y * in_h) / out_h;
    let sx = (x * in_w) / out_w;
    dst[p.dst_off + i] = src[p.src_off + plane * in_h * in_w + sy * in_w + sx];
}
