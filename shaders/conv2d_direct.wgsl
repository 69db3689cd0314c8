// Direct 3x3 convolution, stride 1, padding 1 on every side, for CPU adapters
// (lavapipe): the VAE decoder's full-resolution convolutions with few
// channels. ops/conv2d_direct.rs appends this file to conv2d.wgsl (for its
// `activate`, `wst` alias and `bias` / `wt` bindings) and ops/conv2d.rs routes
// the shapes where it beats the packed path.
//
// Why not the packed path there: its operands live in 64 KiB uniform blocks,
// so a product with 32 or 64 output channels and a K of 288 or 576 runs as a
// few hundred columns per dispatch: thousands of small dispatches per
// convolution, plus the tap packing, which writes every input value nine
// times. Here nothing is packed but the weights (once, for constant weights):
// each invocation reads the input straight from the storage buffer and keeps
// every value it reads for all 9 taps and 8 output channels.
//
// Each invocation computes 4 neighbouring output pixels of one row (one vec4
// of the output row) x 8 output channels (conv3x3_direct16: 16): per input channel it reads 3 vec4s
// of each of 3 input rows (the 4 pixels and one neighbour each side), and
// makes 4 x 9 x 8 products from them. The weights of the 8 channels come from
// a uniform block as vec4s over output channels, the same address in every
// lane. The sum runs over input channels, then kernel rows, then columns,
// each product an fma into the running sum; then bias, activation, scale and
// residual as conv2d_tiled's epilogue.
//
// Bindings:
//   @binding(0)  dp      uniform DirectParams
//   @binding(20) x4      array<st4> (read): x[z, ci, iy, 4q..4q+3] at x_off / 4 + z * x_bstride / 4 + (ci * h + iy) * w / 4 + q
//   @binding(21) out4    array<st4> (read_write): the output, laid out as x with cout channels, from out_off / 4
//   @binding(22) wd      uniform: this dispatch's packed weights (see pack_weights_direct)
//   @binding(3)  bias    array<st> (read): bias[bias_off + co], read only when has_bias = 1
//   @binding(23) res4    array<st4> (read): the residual, laid out as the output from res_off / 4,
//                        read only when has_residual = 1
// Every offset and stride is a multiple of 4 values and w is a multiple of 4
// (the host checks both).

struct DirectParams {
    cin: u32,
    h: u32,
    w: u32,
    cout: u32,        // output channels of this dispatch (its weight block), from channel 0 of out_off
    x_off: u32,
    x_bstride: u32,
    out_off: u32,
    o_bstride: u32,
    bias_off: u32,
    has_bias: u32,
    res_off: u32,
    has_residual: u32,
    scale: f32,
    residual_scale: f32,
    // pack_weights_direct: the first output channel of the block, all
    // output channels, and the weights' element offset in `wt`.
    co0: u32,
    cout_all: u32,
    w_off: u32,
    // Output channels per group of the packing: 8 (conv3x3_direct) or 16
    // (conv3x3_direct16).
    group: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> dp: DirectParams;
@group(0) @binding(20) var<storage, read> x4: array<st4>;
@group(0) @binding(21) var<storage, read_write> out4: array<st4>;
@group(0) @binding(22) var<uniform> wd: array<vec4<f32>, 4096>;
@group(0) @binding(23) var<storage, read> res4: array<st4>;

// Packed weights: block of output channels co0.., group g of G = dp.group
// channels (8 or 16), input channel ci, tap t = ky * 3 + kx: vec4
// ((g * cin + ci) * 9 + t) * G / 4 + j holds channels G * g + 4j..G * g + 4j + 3
// (0 past cout).
//   @binding(2)  wt      array<wst> (read): w[co, ci, ky, kx] at w_off + (co * cin + ci) * 9 + t
//   @binding(24) wpack   array<vec4<f32>> (read_write): the block, from vec4 0
@group(0) @binding(24) var<storage, read_write> wpack: array<vec4<f32>>;

fn direct_weight(co: u32, ci: u32, t: u32) -> f32 {
    if (co >= dp.cout_all) {
        return 0.0;
    }
    return f32(wt[dp.w_off + (co * dp.cin + ci) * 9u + t]);
}

// One vec4 of the block per invocation; x walks the block's vec4s.
@compute @workgroup_size(64)
fn pack_weights_direct(@builtin(global_invocation_id) gid: vec3<u32>) {
    let q = gid.x;
    let per_tap = dp.group / 4u;
    let per_group = dp.cin * 9u * per_tap;
    if (q >= dp.cout * per_group / dp.group) {
        return;
    }
    let g = q / per_group;
    let rest = q - g * per_group;
    let ci = rest / (9u * per_tap);
    let t = (rest - ci * 9u * per_tap) / per_tap;
    let co = dp.co0 + dp.group * g + 4u * (rest % per_tap);
    wpack[q] = vec4(direct_weight(co, ci, t), direct_weight(co + 1u, ci, t),
                    direct_weight(co + 2u, ci, t), direct_weight(co + 3u, ci, t));
}

// The products of one kernel row: input values v0..v5 (columns 4q - 1 ..
// 4q + 4 of one input row) against the weights of its 3 taps, a0/b0 (tap
// 0, channels 0..3 / 4..7), a1/b1, a2/b2. acc[2 * px] holds output pixel
// px's channels 0..3, acc[2 * px + 1] 4..7.
fn kernel_row(acc: ptr<function, array<vec4<f32>, 8>>,
              a0: vec4<f32>, b0: vec4<f32>, a1: vec4<f32>, b1: vec4<f32>, a2: vec4<f32>, b2: vec4<f32>,
              v0: f32, v1: f32, v2: f32, v3: f32, v4: f32, v5: f32) {
    (*acc)[0] = fma(vec4(v2), a2, fma(vec4(v1), a1, fma(vec4(v0), a0, (*acc)[0])));
    (*acc)[1] = fma(vec4(v2), b2, fma(vec4(v1), b1, fma(vec4(v0), b0, (*acc)[1])));
    (*acc)[2] = fma(vec4(v3), a2, fma(vec4(v2), a1, fma(vec4(v1), a0, (*acc)[2])));
    (*acc)[3] = fma(vec4(v3), b2, fma(vec4(v2), b1, fma(vec4(v1), b0, (*acc)[3])));
    (*acc)[4] = fma(vec4(v4), a2, fma(vec4(v3), a1, fma(vec4(v2), a0, (*acc)[4])));
    (*acc)[5] = fma(vec4(v4), b2, fma(vec4(v3), b1, fma(vec4(v2), b0, (*acc)[5])));
    (*acc)[6] = fma(vec4(v5), a2, fma(vec4(v4), a1, fma(vec4(v3), a0, (*acc)[6])));
    (*acc)[7] = fma(vec4(v5), b2, fma(vec4(v4), b1, fma(vec4(v3), b0, (*acc)[7])));
}

// One input row's 6 values for this lane's 4 pixels: the lane's vec4 of row
// `row` and its neighbours (see conv3x3_direct), 0 where `ok` is false (a
// padding row) or past the row's ends.
struct RowValues {
    l: f32,
    m: vec4<f32>,
    r: f32,
}

fn row_values(at: u32, row: u32, ok: bool, has_left: bool, has_right: bool,
              left_shared: bool, right_shared: bool) -> RowValues {
    let m = select(vec4(0.0), vec4<f32>(x4[at + row]), ok);
    var l = subgroupShuffleUp(m.w, 1u);
    var r = subgroupShuffleDown(m.x, 1u);
    if (!left_shared && has_left) {
        l = f32(x4[at + row - 1u].w);
    }
    if (!right_shared && has_right) {
        r = f32(x4[at + row + 1u].x);
    }
    return RowValues(select(0.0, l, ok && has_left), m, select(0.0, r, ok && has_right));
}

// Where an invocation's 4 pixels are and what borders them (see
// conv3x3_direct).
struct Pixels {
    live: bool,
    oy: u32,
    q: u32,
    z: u32,
    has_left: bool,
    has_right: bool,
    has_up: bool,
    has_down: bool,
    left_shared: bool,
    right_shared: bool,
    // The vec4 of the input's row oy (and the rows above and below) in
    // channel 0 of item z.
    mid: u32,
    up: u32,
    down: u32,
}

fn pixels(gid: vec3<u32>, sid: u32, sg_size: u32) -> Pixels {
    return pixel_rows(gid, sid, sg_size, 1u);
}

// The same where each invocation computes `rows` neighbouring output rows
// (1 or 2; 2 needs an even height): gid.x counts the vec4s of every
// `rows`-th row, and the Pixels are those of the first of the rows.
fn pixel_rows(gid: vec3<u32>, sid: u32, sg_size: u32, rows: u32) -> Pixels {
    let w4 = dp.w / 4u;
    let plane4 = dp.h / rows * w4;
    // Lanes past the plane compute its last vec4 again (and store nothing):
    // every lane of a subgroup takes part in the shuffles below.
    let idx = min(gid.x, plane4 - 1u);
    let oy = idx / w4 * rows;
    let q = idx - idx / w4 * w4;
    let z = gid.z;
    // Neighbours past the row's ends and rows past the image are padding:
    // their loads read a valid address and are replaced by zero.
    let has_up = oy > 0u;
    let has_down = oy + 1u < dp.h;
    // A storage load costs a loop over the lanes on lavapipe: the value left
    // of this lane's 4 pixels is the w of the lane before's vec4 where that
    // lane holds the vec4 before, else (the subgroup's first lane) a load;
    // the same for the value on the right.
    let left_shared = sid > 0u && subgroupShuffleUp(idx, 1u) + 1u == idx;
    let right_shared = sid + 1u < sg_size && subgroupShuffleDown(idx, 1u) == idx + 1u;
    let mid = (dp.x_off + z * dp.x_bstride) / 4u + oy * w4 + q;
    let live = gid.x < plane4;
    let has_right = q + 1u < w4;
    return Pixels(live, oy, q, z, q > 0u, has_right, has_up, has_down,
                  left_shared, right_shared, mid,
                  select(mid, mid - w4, has_up), select(mid, mid + w4, has_down));
}

fn input_row(x: Pixels, at: u32, row: u32, ok: bool) -> RowValues {
    return row_values(at, row, ok, x.has_left, x.has_right, x.left_shared, x.right_shared);
}

// Bias, activation, scale and residual, then the stores of 8 output
// channels co0..co0 + 7 (those below dp.cout) from sums laid out as
// kernel_row's acc. The stores run as a loop over a copy of the sums
// (unrolled, each store is a loop over the lanes on lavapipe and the kernel
// compiles slowly).
fn store_channels(x: Pixels, sums: array<vec4<f32>, 8>, co0: u32) {
    var s = sums;
    let w4 = dp.w / 4u;
    let plane = dp.h * dp.w;
    let first = (dp.out_off + x.z * dp.o_bstride) / 4u + x.oy * w4 + x.q;
    let first_res = (dp.res_off + x.z * dp.o_bstride) / 4u + x.oy * w4 + x.q;
    for (var c = 0u; c < 8u; c++) {
        let co = co0 + c;
        if (co >= dp.cout) {
            break;
        }
        let h = c / 4u;
        let k = c % 4u;
        var v = vec4(s[h][k], s[2u + h][k], s[4u + h][k], s[6u + h][k]);
        if (dp.has_bias == 1u) {
            v += vec4(f32(bias[dp.bias_off + co]));
        }
        v = vec4(activate(v.x), activate(v.y), activate(v.z), activate(v.w)) * dp.scale;
        let o = first + co * plane / 4u;
        if (dp.has_residual == 1u) {
            v += dp.residual_scale * vec4<f32>(res4[first_res + co * plane / 4u]);
        }
        out4[o] = st4(v);
    }
}

// x: output vec4s of an item's plane (row-major), y: groups of 8 output
// channels of the block, z: batch items.
@compute @workgroup_size(64)
fn conv3x3_direct(@builtin(global_invocation_id) gid: vec3<u32>,
                  @builtin(subgroup_invocation_id) sid: u32,
                  @builtin(subgroup_size) sg_size: u32) {
    let x = pixels(gid, sid, sg_size);
    let g = gid.y;
    let plane4 = dp.h * dp.w / 4u;
    var acc: array<vec4<f32>, 8>;
    for (var ci = 0u; ci < dp.cin; ci++) {
        let at = ci * plane4;
        // The input channel's 18 weight vec4s (9 taps x 2): a uniform load
        // is a gather on lavapipe whatever the address, so each lane loads
        // different ones and the subgroup shares them by broadcast.
        let wi = (g * dp.cin + ci) * 18u;
        let w0 = wd[wi + sid];
        let w1 = wd[wi + 8u + sid];
        let w2 = wd[wi + 16u + min(sid, 1u)];
        let u = input_row(x, at, x.up, x.has_up);
        kernel_row(&acc,
            subgroupBroadcast(w0, 0u), subgroupBroadcast(w0, 1u), subgroupBroadcast(w0, 2u),
            subgroupBroadcast(w0, 3u), subgroupBroadcast(w0, 4u), subgroupBroadcast(w0, 5u),
            u.l, u.m.x, u.m.y, u.m.z, u.m.w, u.r);
        let c = input_row(x, at, x.mid, true);
        kernel_row(&acc,
            subgroupBroadcast(w0, 6u), subgroupBroadcast(w0, 7u), subgroupBroadcast(w1, 0u),
            subgroupBroadcast(w1, 1u), subgroupBroadcast(w1, 2u), subgroupBroadcast(w1, 3u),
            c.l, c.m.x, c.m.y, c.m.z, c.m.w, c.r);
        let d = input_row(x, at, x.down, x.has_down);
        kernel_row(&acc,
            subgroupBroadcast(w1, 4u), subgroupBroadcast(w1, 5u), subgroupBroadcast(w1, 6u),
            subgroupBroadcast(w1, 7u), subgroupBroadcast(w2, 0u), subgroupBroadcast(w2, 1u),
            d.l, d.m.x, d.m.y, d.m.z, d.m.w, d.r);
    }
    if (x.live) {
        store_channels(x, acc, 8u * g);
    }
}

// conv3x3_direct with 16 output channels per invocation (y: groups of 16;
// weights packed in groups of 16, vec4 ((g * cin + ci) * 9 + t) * 4 + j
// holding channels 16g + 4j..16g + 4j + 3): each input value read serves
// twice the products. Every channel's sum runs in conv3x3_direct's order,
// so the two give the same bits.
@compute @workgroup_size(64)
fn conv3x3_direct16(@builtin(global_invocation_id) gid: vec3<u32>,
                    @builtin(subgroup_invocation_id) sid: u32,
                    @builtin(subgroup_size) sg_size: u32) {
    direct16(gid, sid, sg_size, 1u);
}

// conv3x3_direct16 for two output rows per invocation (oy and oy + 1, oy
// even; the host routes here only even heights): 4 input rows serve both,
// and each weight gathered and broadcast serves twice the products. x: the
// vec4s of the even rows, y and z as conv3x3_direct16.
@compute @workgroup_size(64)
fn conv3x3_direct16_rows2(@builtin(global_invocation_id) gid: vec3<u32>,
                          @builtin(subgroup_invocation_id) sid: u32,
                          @builtin(subgroup_size) sg_size: u32) {
    direct16(gid, sid, sg_size, 2u);
}

// The two entry points above: `rows` (a constant at each call, so the
// compiler drops the other case) output rows per invocation, 1 or 2. Each
// output's sum runs in conv3x3_direct's order (input channel, kernel row,
// tap) whatever `rows` is, so the outputs are the same bits.
fn direct16(gid: vec3<u32>, sid: u32, sg_size: u32, rows: u32) {
    let x = pixel_rows(gid, sid, sg_size, rows);
    let g = gid.y;
    let plane4 = dp.h * dp.w / 4u;
    // Row oy + 2, below the second output row (rows = 2).
    let has_below = x.oy + 2u < dp.h;
    let below = select(x.down, x.down + dp.w / 4u, has_below);
    // Channels 0..7 and 8..15 of the group, each laid out as kernel_row's
    // acc, for output row oy, and (lo2, hi2) row oy + 1.
    var lo: array<vec4<f32>, 8>;
    var hi: array<vec4<f32>, 8>;
    var lo2: array<vec4<f32>, 8>;
    var hi2: array<vec4<f32>, 8>;
    for (var ci = 0u; ci < dp.cin; ci++) {
        let at = ci * plane4;
        let k = weight_rows(g, ci, sid);
        let u = input_row(x, at, x.up, x.has_up);
        row_lo(&lo, k.k0, u);
        row_hi(&hi, k.k0, u);
        let c = input_row(x, at, x.mid, true);
        row_lo(&lo, k.k1, c);
        row_hi(&hi, k.k1, c);
        if (rows == 2u) {
            row_lo(&lo2, k.k0, c);
            row_hi(&hi2, k.k0, c);
        }
        let d = input_row(x, at, x.down, x.has_down);
        row_lo(&lo, k.k2, d);
        row_hi(&hi, k.k2, d);
        if (rows == 2u) {
            row_lo(&lo2, k.k1, d);
            row_hi(&hi2, k.k1, d);
            let e = input_row(x, at, below, has_below);
            row_lo(&lo2, k.k2, e);
            row_hi(&hi2, k.k2, e);
        }
    }
    if (x.live) {
        store_channels(x, lo, 16u * g);
        store_channels(x, hi, 16u * g + 8u);
        if (rows == 2u) {
            var x2 = x;
            x2.oy = x.oy + 1u;
            store_channels(x2, lo2, 16u * g);
            store_channels(x2, hi2, 16u * g + 8u);
        }
    }
}

// The weights of one kernel row for 16 channels, broadcast: a (channels
// 0..3) and b (4..7) of taps 0, 1, 2 for the low 8 channels, then the same
// for the high 8 (the arguments of kernel_row).
struct TapRow {
    la0: vec4<f32>, lb0: vec4<f32>, la1: vec4<f32>, lb1: vec4<f32>, la2: vec4<f32>, lb2: vec4<f32>,
    ha0: vec4<f32>, hb0: vec4<f32>, ha1: vec4<f32>, hb1: vec4<f32>, ha2: vec4<f32>, hb2: vec4<f32>,
}

fn row_lo(acc: ptr<function, array<vec4<f32>, 8>>, t: TapRow, v: RowValues) {
    kernel_row(acc, t.la0, t.lb0, t.la1, t.lb1, t.la2, t.lb2, v.l, v.m.x, v.m.y, v.m.z, v.m.w, v.r);
}

fn row_hi(acc: ptr<function, array<vec4<f32>, 8>>, t: TapRow, v: RowValues) {
    kernel_row(acc, t.ha0, t.hb0, t.ha1, t.hb1, t.ha2, t.hb2, v.l, v.m.x, v.m.y, v.m.z, v.m.w, v.r);
}

// The 36 weight vec4s of input channel ci for group g (9 taps x 4), shared
// by broadcast: vec4 t * 4 + j is lane (t * 4 + j) % 8 of w[(t * 4 + j) / 8],
// each lane loading different ones (a uniform load is a gather on lavapipe
// whatever the address).
struct WeightRows {
    k0: TapRow,
    k1: TapRow,
    k2: TapRow,
}

fn weight_rows(g: u32, ci: u32, sid: u32) -> WeightRows {
    let wi = (g * dp.cin + ci) * 36u;
    let w0 = wd[wi + sid];
    let w1 = wd[wi + 8u + sid];
    let w2 = wd[wi + 16u + sid];
    let w3 = wd[wi + 24u + sid];
    let w4 = wd[wi + 32u + min(sid, 3u)];
    return WeightRows(
        TapRow(
            subgroupBroadcast(w0, 0u), subgroupBroadcast(w0, 1u), subgroupBroadcast(w0, 4u),
            subgroupBroadcast(w0, 5u), subgroupBroadcast(w1, 0u), subgroupBroadcast(w1, 1u),
            subgroupBroadcast(w0, 2u), subgroupBroadcast(w0, 3u), subgroupBroadcast(w0, 6u),
            subgroupBroadcast(w0, 7u), subgroupBroadcast(w1, 2u), subgroupBroadcast(w1, 3u)),
        TapRow(
            subgroupBroadcast(w1, 4u), subgroupBroadcast(w1, 5u), subgroupBroadcast(w2, 0u),
            subgroupBroadcast(w2, 1u), subgroupBroadcast(w2, 4u), subgroupBroadcast(w2, 5u),
            subgroupBroadcast(w1, 6u), subgroupBroadcast(w1, 7u), subgroupBroadcast(w2, 2u),
            subgroupBroadcast(w2, 3u), subgroupBroadcast(w2, 6u), subgroupBroadcast(w2, 7u)),
        TapRow(
            subgroupBroadcast(w3, 0u), subgroupBroadcast(w3, 1u), subgroupBroadcast(w3, 4u),
            subgroupBroadcast(w3, 5u), subgroupBroadcast(w4, 0u), subgroupBroadcast(w4, 1u),
            subgroupBroadcast(w3, 2u), subgroupBroadcast(w3, 3u), subgroupBroadcast(w3, 6u),
            subgroupBroadcast(w3, 7u), subgroupBroadcast(w4, 2u), subgroupBroadcast(w4, 3u)));
}
