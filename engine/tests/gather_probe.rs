//! `cargo test --release -p motif-engine --test gather_probe -- --ignored
//! --nocapture`: what one lane-varying vec4 load costs on this adapter when
//! it comes from a uniform buffer, a storage buffer or a texture
//! (`textureLoad` of rgba32float). On Mesa 22.3's lavapipe the first two are
//! per-lane loops (issue 22; docs/PERFORMANCE.md); this measures whether the
//! texture path is cheaper before any kernel is moved to it. A measurement,
//! not a check: it prints the wall time per load and asserts only that the
//! three kernels summed the same values.

use std::time::Instant;

/// vec4s in each source: one 64 KiB uniform block, a 64x64 texture.
const VALUES: u32 = 4096;
/// Loads per invocation.
const LOADS: u32 = 256;
/// Workgroups of 8 invocations (one lavapipe subgroup) per dispatch.
const GROUPS: u32 = 2048;

const SHADER: &str = r#"
@group(0) @binding(0) var<uniform> ubo: array<vec4<f32>, 4096>;
@group(0) @binding(1) var<storage, read> ssbo: array<vec4<f32>>;
@group(0) @binding(2) var tex: texture_2d<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;

// A different address in every lane and every iteration.
fn at(lid: u32, wid: u32, i: u32) -> u32 {
    return (lid * 517u + i * 13u + wid * 7u) & 4095u;
}

@compute @workgroup_size(8)
fn from_uniform(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    var acc = vec4(0.0);
    for (var i = 0u; i < 256u; i++) {
        acc += ubo[at(lid, wid.x, i)];
    }
    out[wid.x * 8u + lid] = acc;
}

@compute @workgroup_size(8)
fn from_storage(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    var acc = vec4(0.0);
    for (var i = 0u; i < 256u; i++) {
        acc += ssbo[at(lid, wid.x, i)];
    }
    out[wid.x * 8u + lid] = acc;
}

@compute @workgroup_size(8)
fn from_texture(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    var acc = vec4(0.0);
    for (var i = 0u; i < 256u; i++) {
        let a = at(lid, wid.x, i);
        acc += textureLoad(tex, vec2(a & 63u, a >> 6u), 0);
    }
    out[wid.x * 8u + lid] = acc;
}
"#;

#[test]
#[ignore = "a measurement for docs/PERFORMANCE.md, not a check"]
fn lane_varying_loads_from_uniform_storage_and_texture() {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::VULKAN;
    let instance = wgpu::Instance::new(desc);
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::VULKAN));
    let adapter = adapters
        .into_iter()
        .find(|a| a.get_info().device_type == wgpu::DeviceType::Cpu)
        .expect("a CPU Vulkan adapter (lavapipe)");
    println!(
        "adapter: {} ({})",
        adapter.get_info().name,
        adapter.get_info().driver_info
    );
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("gather probe"),
        required_features: wgpu::Features::empty(),
        required_limits: adapter.limits(),
        experimental_features: wgpu::ExperimentalFeatures::disabled(),
        memory_hints: wgpu::MemoryHints::Performance,
        trace: wgpu::Trace::Off,
    }))
    .expect("device");

    let values: Vec<f32> = (0..VALUES * 4).map(|i| (i % 97) as f32 * 0.25).collect();
    let bytes: &[u8] = bytemuck::cast_slice(&values);
    let buffer = |usage: wgpu::BufferUsages| {
        let b = device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes.len() as u64,
            usage: usage | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        queue.write_buffer(&b, 0, bytes);
        b
    };
    let ubo = buffer(wgpu::BufferUsages::UNIFORM);
    let ssbo = buffer(wgpu::BufferUsages::STORAGE);
    let size = wgpu::Extent3d {
        width: 64,
        height: VALUES / 64,
        depth_or_array_layers: 1,
    };
    let texture = device.create_texture(&wgpu::TextureDescriptor {
        label: None,
        size,
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format: wgpu::TextureFormat::Rgba32Float,
        usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
        view_formats: &[],
    });
    queue.write_texture(
        texture.as_image_copy(),
        bytes,
        wgpu::TexelCopyBufferLayout {
            offset: 0,
            bytes_per_row: Some(64 * 16),
            rows_per_image: None,
        },
        size,
    );
    let view = texture.create_view(&wgpu::TextureViewDescriptor::default());
    let out_bytes = (GROUPS * 8 * 16) as u64;
    let out = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: out_bytes,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let readback = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: out_bytes,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("gather probe"),
        source: wgpu::ShaderSource::Wgsl(SHADER.into()),
    });

    let mut sums: Vec<Vec<f32>> = Vec::new();
    for entry in ["from_uniform", "from_storage", "from_texture"] {
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        });
        // Each entry point uses its own source and `out`: bind what its
        // layout has.
        let source = match entry {
            "from_uniform" => (0, ubo.as_entire_binding()),
            "from_storage" => (1, ssbo.as_entire_binding()),
            _ => (2, wgpu::BindingResource::TextureView(&view)),
        };
        let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: source.0,
                    resource: source.1,
                },
                wgpu::BindGroupEntry {
                    binding: 3,
                    resource: out.as_entire_binding(),
                },
            ],
        });
        let run = |copy: bool| {
            let mut encoder = device.create_command_encoder(&Default::default());
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &bind, &[]);
                pass.dispatch_workgroups(GROUPS, 1, 1);
            }
            if copy {
                encoder.copy_buffer_to_buffer(&out, 0, &readback, 0, out_bytes);
            }
            queue.submit([encoder.finish()]);
            device
                .poll(wgpu::PollType::wait_indefinitely())
                .expect("poll");
        };
        run(true); // compiles, and its sums are the check
        let slice = readback.slice(..);
        slice.map_async(wgpu::MapMode::Read, |r| r.expect("map"));
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .expect("poll");
        let mapped = slice.get_mapped_range().expect("mapped range");
        sums.push(bytemuck::cast_slice::<u8, f32>(&mapped).to_vec());
        drop(mapped);
        readback.unmap();
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            run(false);
            best = best.min(t.elapsed().as_secs_f64());
        }
        let loads = (GROUPS * 8 * LOADS) as f64;
        println!(
            "{entry:>13}: {:.1} ms per dispatch, {:.2} ns per lane-varying vec4 load",
            best * 1e3,
            best * 1e9 / loads
        );
    }
    assert_eq!(sums[0], sums[1], "uniform and storage loads differ");
    assert_eq!(sums[0], sums[2], "uniform and texture loads differ");
}
