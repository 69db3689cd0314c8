// Rotary position embedding on interleaved channel pairs, as diffusers'
// Wan attention applies it (`x.unflatten(-1, (-1, 2))`, tables built with
// `repeat_interleave_real=True`): in every head, the pair (2i, 2i+1) of a
// token at sequence position s is rotated by the angle θ[s, i]:
//   out[2i]   = x[2i] cos θ − x[2i+1] sin θ
//   out[2i+1] = x[2i] sin θ + x[2i+1] cos θ
//
// Bindings:
//   @binding(0) p          uniform Params
//   @binding(1) x          array<st> (read): [rows, heads · 2 · half], rows = B · S tokens
//   @binding(2) cos_table  array<f32> (read): [S, half], cos θ (f32 whatever the storage)
//   @binding(3) sin_table  array<f32> (read): [S, half], sin θ
//   @binding(4) out        array<st> (read_write): x's shape
// One invocation per pair. `row0` is the global row of this window's first
// row (tensors larger than one binding run in windows of rows); the token's
// position is its row modulo S.

struct Params {
    pairs: u32,     // pairs in this window: rows · heads · half
    x_off: u32,
    out_off: u32,
    row0: u32,
    seq: u32,       // S
    heads: u32,
    half: u32,      // head_dim / 2
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<st>;
@group(0) @binding(2) var<storage, read> cos_table: array<f32>;
@group(0) @binding(3) var<storage, read> sin_table: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<st>;

const WG: u32 = 256u;

@compute @workgroup_size(WG)
fn rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.pairs) { return; }
    let per_row = p.heads * p.half;
    let row = i / per_row;
    let pair_in_row = i - row * per_row;
    let f = pair_in_row % p.half;
    let s = (p.row0 + row) % p.seq;
    let c = cos_table[s * p.half + f];
    let sn = sin_table[s * p.half + f];
    let idx = 2u * i;
    let x1 = f32(x[p.x_off + idx]);
    let x2 = f32(x[p.x_off + idx + 1u]);
    out[p.out_off + idx] = st(x1 * c - x2 * sn);
    out[p.out_off + idx + 1u] = st(x1 * sn + x2 * c);
}
