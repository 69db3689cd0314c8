// Preview frames: the x0 latents through the model's linear latent-to-RGB
// projection, written as RGBA8 texels that are then copied, on the GPU,
// into one layer per frame of the viewer's texture.
//
// latent_rgb bindings:
//   @binding(0) p        uniform Params
//   @binding(1) latents  array<st> (read): x0 [C, F, h, w]
//   @binding(2) proj     array<f32> (read): C rows of (r, g, b) weights, then the (r, g, b) bias
//   @binding(3) texels   array<u32> (write): [F, h, row_texels] RGBA8, r in the low byte;
//                        rows are padded to row_texels (a copy to a texture needs rows
//                        of a multiple of 256 bytes)
// One invocation per pixel: x, y over the frame, z over the frames.

struct Params {
    channels: u32,
    frames: u32,
    height: u32,
    width: u32,
    row_texels: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> latents: array<st>;
@group(0) @binding(2) var<storage, read> proj: array<f32>;
@group(0) @binding(3) var<storage, read_write> texels: array<u32>;

const WG_X: u32 = 8u;
const WG_Y: u32 = 8u;

// [-1, 1] → a byte, as the CPU preview does.
fn to_byte(v: f32) -> u32 {
    return u32(clamp(round((v + 1.0) * 127.5), 0.0, 255.0));
}

@compute @workgroup_size(WG_X, WG_Y, 1)
fn latent_rgb(@builtin(global_invocation_id) gid: vec3<u32>) {
    let x = gid.x;
    let y = gid.y;
    let f = gid.z;
    if (x >= p.width || y >= p.height || f >= p.frames) {
        return;
    }
    let plane = p.height * p.width;
    let bias = 3u * p.channels;
    var rgb = vec3<f32>(proj[bias], proj[bias + 1u], proj[bias + 2u]);
    for (var c = 0u; c < p.channels; c++) {
        let v = f32(latents[(c * p.frames + f) * plane + y * p.width + x]);
        rgb += v * vec3<f32>(proj[3u * c], proj[3u * c + 1u], proj[3u * c + 2u]);
    }
    let texel = to_byte(rgb.r) | (to_byte(rgb.g) << 8u) | (to_byte(rgb.b) << 16u) | (255u << 24u);
    texels[(f * p.height + y) * p.row_texels + x] = texel;
}
