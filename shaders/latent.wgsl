// The per-element work of a denoising loop, kept on the GPU so that no
// latent-sized data crosses to the CPU between steps: the model's input
// batch, classifier-free guidance, the scheduler's update (a short program
// of f32 operations whose coefficients the CPU computes per step), camera
// guidance's pull towards the first frame, the still's anchoring of the
// first frame, the per-frame repeat of text embeddings and the regrouping
// and quantisation of decoded frames.
//
// Every entry point reads `p` at @binding(0) and has its own storage slots:
//   program       1..3, 18, 19  inputs  array<f32> (read): the program's
//                       inputs 0..4, each [n]
//                 4..6  outputs array<f32> (write): the program's outputs, each [n]
//   batch_input   7     x       array<f32> [n] (read): latents
//                 8     out     array<st> [count, n]: x / divisor, `count` times
//   guide         9     uncond  array<st> (read): from element k on, [n]
//                 17    cond    array<st> (read): from element m on, [n]
//                 10    out     array<f32> [n]: cond, or with count 2 guided
//   repeat_rows   11    rows    array<st> [count, n] (read)
//                 12    out     array<st> [count, k, n]: each row `k` times
//   frames_rgb8   13    images  array<st> [count, 3, n] (read), n = H·W, in [-1, 1]
//                 14    out     array<u32>: RGB8 [count, n, 3], four bytes a word
//   latent_frames 15    x       array<f32> [m, k, n] (read): latents [C, F, h·w]
//                 16    out     array<st> [count, m, n]: frames first..first+count
//   camera_mix    20    x       array<f32> [count, k, n] (read): latents [C, F, h·w]
//                 21    x0      array<f32> [count, k, n] (read): their clean estimate
//                 22    warp    array<f32> [k − 1, n, 6] (read): per pixel of frames
//                       1.., the four frame-0 pixels it samples (plane offsets
//                       y0·w+x0, y0·w+x1, y1·w+x0, y1·w+x1, as whole f32) and
//                       the bilinear weights fx, fy
//                 23    out     array<f32> [count, k, n]; consts 0..5: a, b,
//                       keep_x, take_x, keep_e, take_e
//   put_frame     24    x       array<f32> [count, k, n] (read): latents [C, F, h·w]
//                 25    frame   array<f32> [count, n] (read)
//                 26    out     array<f32> [count, k, n]: x with frame `first` = frame
// The dispatch is 1-D, spread over x and y (at most 65535 workgroups per
// dimension).

struct Params {
    n: u32,
    count: u32,
    k: u32,
    m: u32,
    first: u32,
    instructions: u32,
    scale: f32,
    divisor: f32,
    // Program: one instruction per row (opcode, a, b, c), see `run_program`.
    code: array<vec4<u32>, 32>,
    consts: array<vec4<f32>, 4>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> in0: array<f32>;
@group(0) @binding(2) var<storage, read> in1: array<f32>;
@group(0) @binding(3) var<storage, read> in2: array<f32>;
@group(0) @binding(18) var<storage, read> in3: array<f32>;
@group(0) @binding(19) var<storage, read> in4: array<f32>;
@group(0) @binding(4) var<storage, read_write> out0: array<f32>;
@group(0) @binding(5) var<storage, read_write> out1: array<f32>;
@group(0) @binding(6) var<storage, read_write> out2: array<f32>;
@group(0) @binding(7) var<storage, read> bi_x: array<f32>;
@group(0) @binding(8) var<storage, read_write> bi_out: array<st>;
@group(0) @binding(9) var<storage, read> g_uncond: array<st>;
@group(0) @binding(17) var<storage, read> g_cond: array<st>;
@group(0) @binding(10) var<storage, read_write> g_out: array<f32>;
@group(0) @binding(11) var<storage, read> r_rows: array<st>;
@group(0) @binding(12) var<storage, read_write> r_out: array<st>;
@group(0) @binding(13) var<storage, read> f_images: array<st>;
@group(0) @binding(14) var<storage, read_write> f_out: array<u32>;
@group(0) @binding(15) var<storage, read> lf_x: array<f32>;
@group(0) @binding(16) var<storage, read_write> lf_out: array<st>;
@group(0) @binding(20) var<storage, read> cm_x: array<f32>;
@group(0) @binding(21) var<storage, read> cm_x0: array<f32>;
@group(0) @binding(22) var<storage, read> cm_warp: array<f32>;
@group(0) @binding(23) var<storage, read_write> cm_out: array<f32>;
@group(0) @binding(24) var<storage, read> pf_x: array<f32>;
@group(0) @binding(25) var<storage, read> pf_frame: array<f32>;
@group(0) @binding(26) var<storage, read_write> pf_out: array<f32>;

const WG: u32 = 256u;
const REGISTERS: u32 = 32u;

fn linear_index(wid: vec3<u32>, lid: u32, nwg: vec3<u32>) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

fn load_input(slot: u32, i: u32) -> f32 {
    switch slot {
        case 0u: { return in0[i]; }
        case 1u: { return in1[i]; }
        case 2u: { return in2[i]; }
        case 3u: { return in3[i]; }
        default: { return in4[i]; }
    }
}

fn store_output(slot: u32, i: u32, v: f32) {
    switch slot {
        case 0u: { out0[i] = v; }
        case 1u: { out1[i] = v; }
        default: { out2[i] = v; }
    }
}

fn constant(j: u32) -> f32 {
    return p.consts[j / 4u][j % 4u];
}

// An operand below REGISTERS names a register, above it a constant.
fn operand(r: ptr<function, array<f32, REGISTERS>>, v: u32) -> f32 {
    if v >= REGISTERS { return constant(v - REGISTERS); }
    return (*r)[v];
}

// Opcodes (see `ops::latent::ElementProgram`): 0 load r[a] = input b;
// 2 add, 3 sub, 4 mul, 5 div: r[a] = b op c; 6 r[a] = clamp(b, -c, c);
// 7 store output a = b; b and c are operands.
@compute @workgroup_size(WG)
fn run_program(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(wid, lid, nwg);
    if i >= p.n { return; }
    var r: array<f32, REGISTERS>;
    for (var k = 0u; k < p.instructions; k++) {
        let op = p.code[k];
        switch op.x {
            case 0u: { r[op.y] = load_input(op.z, i); }
            case 2u: { r[op.y] = operand(&r, op.z) + operand(&r, op.w); }
            case 3u: { r[op.y] = operand(&r, op.z) - operand(&r, op.w); }
            case 4u: { r[op.y] = operand(&r, op.z) * operand(&r, op.w); }
            case 5u: { r[op.y] = operand(&r, op.z) / operand(&r, op.w); }
            case 6u: { let c = operand(&r, op.w); r[op.y] = clamp(operand(&r, op.z), -c, c); }
            default: { store_output(op.y, i, operand(&r, op.z)); }
        }
    }
}

@compute @workgroup_size(WG)
fn batch_input(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(wid, lid, nwg);
    if i >= p.n * p.count { return; }
    bi_out[i] = st(bi_x[i % p.n] / p.divisor);
}

@compute @workgroup_size(WG)
fn guide(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
         @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(wid, lid, nwg);
    if i >= p.n { return; }
    let c = f32(g_cond[p.m + i]);
    if p.count == 1u {
        g_out[i] = c;
        return;
    }
    let u = f32(g_uncond[p.k + i]);
    g_out[i] = u + p.scale * (c - u);
}

@compute @workgroup_size(WG)
fn repeat_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(wid, lid, nwg);
    if i >= p.count * p.k * p.n { return; }
    let row = i / (p.k * p.n);
    r_out[i] = r_rows[row * p.n + i % p.n];
}

// diffusers' postprocessing, x / 2 + 0.5 clamped to [0, 1], then
// round(v · 255) with halves rounded away from zero (Rust's `f32::round`;
// WGSL's `round` rounds halves to even).
fn to_byte(x: f32) -> u32 {
    let v = clamp(x / 2.0 + 0.5, 0.0, 1.0);
    let s = v * 255.0;
    let f = floor(s);
    return u32(select(f, f + 1.0, s - f >= 0.5));
}

@compute @workgroup_size(WG)
fn frames_rgb8(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let word = linear_index(wid, lid, nwg);
    let bytes = p.count * p.n * 3u;
    if word * 4u >= bytes { return; }
    var packed = 0u;
    for (var b = 0u; b < 4u; b++) {
        let j = word * 4u + b;
        if j < bytes {
            let pixel = j / 3u;
            let channel = j % 3u;
            let frame = pixel / p.n;
            let at = pixel % p.n;
            packed |= to_byte(f32(f_images[(frame * 3u + channel) * p.n + at])) << (8u * b);
        }
    }
    f_out[word] = packed;
}

@compute @workgroup_size(WG)
fn latent_frames(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(wid, lid, nwg);
    if i >= p.count * p.m * p.n { return; }
    let frame = i / (p.m * p.n);
    let channel = (i / p.n) % p.m;
    let at = i % p.n;
    lf_out[i] = st(lf_x[(channel * p.k + p.first + frame) * p.n + at]);
}

// The noise part of latents x = a·x0 + b·eps at element j.
fn camera_eps(j: u32) -> f32 {
    return (cm_x[j] - constant(0u) * cm_x0[j]) / constant(1u);
}

// Camera guidance (pipelines::camera): every pixel of frames 1.. pulled
// towards frame 0 sampled bilinearly along the move, the clean part
// linearly and the noise part with square-root weights, in the f32
// operations and order of `camera_mix_reference`.
@compute @workgroup_size(WG)
fn camera_mix(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(wid, lid, nwg);
    if i >= p.count * p.k * p.n { return; }
    let at = i % p.n;
    let frame = (i / p.n) % p.k;
    if frame == 0u {
        cm_out[i] = cm_x[i];
        return;
    }
    let first = (i / (p.n * p.k)) * p.k * p.n;
    let m = ((frame - 1u) * p.n + at) * 6u;
    let j00 = first + u32(cm_warp[m]);
    let j01 = first + u32(cm_warp[m + 1u]);
    let j10 = first + u32(cm_warp[m + 2u]);
    let j11 = first + u32(cm_warp[m + 3u]);
    let fx = cm_warp[m + 4u];
    let fy = cm_warp[m + 5u];
    let x0_row0 = cm_x0[j00] * (1.0 - fx) + cm_x0[j01] * fx;
    let x0_row1 = cm_x0[j10] * (1.0 - fx) + cm_x0[j11] * fx;
    let warped_x0 = x0_row0 * (1.0 - fy) + x0_row1 * fy;
    let eps_row0 = camera_eps(j00) * (1.0 - fx) + camera_eps(j01) * fx;
    let eps_row1 = camera_eps(j10) * (1.0 - fx) + camera_eps(j11) * fx;
    let warped_eps = eps_row0 * (1.0 - fy) + eps_row1 * fy;
    let xm = constant(2u) * cm_x0[i] + constant(3u) * warped_x0;
    let em = constant(4u) * camera_eps(i) + constant(5u) * warped_eps;
    cm_out[i] = constant(0u) * xm + constant(1u) * em;
}

@compute @workgroup_size(WG)
fn put_frame(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32,
             @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_index(wid, lid, nwg);
    if i >= p.count * p.k * p.n { return; }
    let at = i % p.n;
    let frame = (i / p.n) % p.k;
    let channel = i / (p.n * p.k);
    if frame == p.first {
        pf_out[i] = pf_frame[channel * p.n + at];
    } else {
        pf_out[i] = pf_x[i];
    }
}
