// Embedding gather and sinusoidal timestep embedding.
//
// gather bindings:
//   @binding(0) p      uniform Params
//   @binding(1) table  array<st> (read): rows [row0, row0 + rows) of the [V, D] table
//   @binding(2) ids    array<u32> (read): n ids
//   @binding(3) out    array<st> (write): [n, D]
// A table larger than one storage binding is gathered in row windows; each
// dispatch writes only the outputs whose id falls inside its window.
//
// timestep bindings:
//   @binding(0) p      uniform Params
//   @binding(4) t      array<f32> (read): n timesteps
//   @binding(5) freqs  array<f32> (read): D/2 frequencies
//   @binding(3) out    array<st> (write): [n, D]

struct Params {
    n: u32,          // gather: ids; timestep: timesteps
    d: u32,          // embedding width
    row0: u32,       // gather: first table row in this window
    rows: u32,       // gather: rows in this window
    table_off: u32,  // gather: element offset of row0 inside the table binding
    flip: u32,       // timestep: 1 = [cos, sin] (flip_sin_to_cos), 0 = [sin, cos]
    scale: f32,      // timestep: multiplies t·f_j
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    _pad3: u32,
    _pad4: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> table: array<st>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<st>;
@group(0) @binding(4) var<storage, read> t: array<f32>;
@group(0) @binding(5) var<storage, read> freqs: array<f32>;

const WG: u32 = 256u;

@compute @workgroup_size(WG)
fn gather(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.n * p.d) { return; }
    let row = i / p.d;
    let col = i - row * p.d;
    let id = ids[row];
    if (id < p.row0 || id >= p.row0 + p.rows) { return; }
    out[i] = table[p.table_off + (id - p.row0) * p.d + col];
}

// Sine and cosine of an f32 argument far outside [-π, π] (timesteps reach
// 1000 rad): Cody-Waite reduction by π/2 in three parts (q·P1 is exact for
// |q| < 2^15), then Taylor polynomials on [-π/4, π/4] (error < 1e-8). The
// builtins only promise 2^-11 absolute error, and only inside [-π, π].
fn sin_cos(x: f32) -> vec2<f32> {
    let q = round(x * 0.6366197723675814);
    let r = ((x - q * 1.5703125) - q * 4.837512969970703125e-4) - q * 7.54978995489188216e-8;
    let r2 = r * r;
    let s = r * (1.0 + r2 * (-1.0 / 6.0 + r2 * (1.0 / 120.0 + r2 * (-1.0 / 5040.0 + r2 * (1.0 / 362880.0)))));
    let c = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24.0 + r2 * (-1.0 / 720.0 + r2 * (1.0 / 40320.0 + r2 * (-1.0 / 3628800.0)))));
    switch (i32(q) & 3) {
        case 0: { return vec2<f32>(s, c); }
        case 1: { return vec2<f32>(c, -s); }
        case 2: { return vec2<f32>(-s, -c); }
        default: { return vec2<f32>(-c, s); }
    }
}

// diffusers `get_timestep_embedding`: columns j < half hold sin(scale·t·f_j)
// and the others cos (swapped with flip_sin_to_cos); an odd D gets a zero
// last column. The frequencies f_j come from the CPU, rounded to f32 as
// PyTorch computes them, so that t·f_j is the same f32 number as diffusers'.
@compute @workgroup_size(WG)
fn timestep(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
            @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.n * p.d) { return; }
    let row = i / p.d;
    let col = i - row * p.d;
    let half = p.d / 2u;
    if (col >= 2u * half) {
        out[i] = st(0.0);
        return;
    }
    let j = col % half;
    let arg = (t[row] * freqs[j]) * p.scale;
    let sc = sin_cos(arg);
    let use_cos = (col >= half) != (p.flip == 1u);
    out[i] = st(select(sc.x, sc.y, use_cos));
}
