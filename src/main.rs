//! `motif`: the command-line front end. It parses arguments, shows progress
//! and calls into the engine; no model or GPU logic lives here.

mod bench_coop;
mod bundled;
mod catalog;
mod discord;
mod generate;
mod remote;
mod serve;
mod view;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use motif_engine::{gpu, DType, Gpu, GpuOptions};

#[derive(Parser)]
#[command(
    name = "motif",
    version,
    about = "Local text-to-video and image animation on any GPU (Vulkan, Metal, DX12, or the software Vulkan driver)"
)]
struct Cli {
    /// GPU adapter to use: an index from `motif info` or part of its name (e.g. `nvidia`, `llvmpipe`).
    #[arg(long, global = true, env = "MOTIF_ADAPTER")]
    adapter: Option<String>,
    /// Storage precision: f16 (default on GPUs with SHADER_F16) or f32 (default on CPU adapters).
    #[arg(long, global = true, env = "MOTIF_PRECISION", value_parser = parse_precision)]
    precision: Option<DType>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a clip from a prompt, or animate a still (--image), and write it as MP4, GIF, WebP or PNG frames.
    Generate(Box<generate::GenerateArgs>),
    /// Open the viewer: controls, live preview of every frame while it denoises, playback, export, gallery.
    View(Box<view::ViewArgs>),
    /// List the style presets for --style.
    Styles,
    /// List the models Motif finds: the bundled default, the models folder (MOTIF_MODELS) and the Hugging Face cache.
    Models,
    /// List GPU adapters and show the chosen one with its features and limits.
    Info,
    /// Time the engine's operators on the chosen adapter.
    Bench {
        /// Run the operator benchmarks (matmul, conv, attention, group norm, elementwise).
        #[arg(long)]
        ops: bool,
        /// Repetitions per case (after one warm-up run).
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Benchmark both f32 and f16 (where the adapter stores f16), not only the run's precision.
        #[arg(long)]
        all_precisions: bool,
        /// Time one denoising step of the real-size UNet (SD1.5 + AnimateDiff v2 motion modules, random weights).
        #[arg(long)]
        unet: bool,
        /// With --unet: walk the step through the allocator without running it and report its peak memory.
        #[arg(long)]
        plan: bool,
        /// Wan2.1-T2V-1.3B (random weights): with --plan its whole generation (UMT5-XXL text encoding, one denoising step, the
        /// decode) instead of the UNet, by phase; alone, one denoising step timed (--json: as JSON); --size default 832x480x81.
        #[arg(long)]
        wan: bool,
        /// With --plan: Wan2.1-I2V-14B's whole generation with its image encoder (CLIP ViT-H), the conditioning video's encode and the
        /// 36-channel input, by phase; --size default 832x480x81.
        #[arg(long, requires = "plan")]
        wan_i2v: bool,
        /// With --unet or --model: the workload as WIDTHxHEIGHTxFRAMES (--unet: default 512x512x16 on GPUs, 128x128x4 on CPU adapters and always 512x512x16 with --plan; --model: the model's own defaults).
        #[arg(long, value_parser = parse_workload)]
        size: Option<(usize, usize, usize)>,
        /// Time a real model's generation part by part (load, first preview, CLIP encode, UNet step, VAE decode, whole generations): a name from `motif models` or a folder. The PyTorch side of the same measurement is tools/bench/torch_side.py.
        #[arg(long, value_name = "MODEL")]
        model: Option<String>,
        /// With --model: the step counts of the whole generations to time.
        #[arg(long, value_delimiter = ',', default_value = "4,25")]
        steps: Vec<usize>,
        /// With --model: the guidance scale (above 1: batch 2, as diffusers runs it).
        #[arg(long, default_value_t = 7.5)]
        guidance: f32,
        /// With --model: the prompt.
        #[arg(long, default_value = "a yellow star spinning over the sea at night")]
        prompt: String,
        /// With --model: print the report as one JSON object on stdout (progress goes to stderr).
        #[arg(long)]
        json: bool,
        /// Check and time the tensor-core (cooperative-matrix) kernels (matmul, convolution, attention) against the CPU reference and the portable kernels.
        #[arg(long)]
        coop: bool,
        /// Tune the kernels: try every variant of matmul, convolution and attention on the models' shape classes, check each against the CPU reference and the portable kernel, and write the fastest correct one per class to this adapter's tuning file (beside the pipeline cache; MOTIF_TUNING=off ignores it). --json: the trials as JSON.
        #[arg(long)]
        tune: bool,
        /// With --tune: stop starting new shape classes after this many seconds (the classes come most important first; those left keep the defaults).
        #[arg(long, value_name = "SECONDS")]
        tune_seconds: Option<u64>,
        /// With --wan (timed): only the first N of the transformer's 30 blocks (a quick check of the plumbing on a CPU adapter).
        #[arg(long, value_name = "N")]
        wan_layers: Option<usize>,
        /// With --plan --wan: plan Wan2.2-TI2V-5B (image-to-video, 1280x704x121 unless --size) instead of Wan2.1-1.3B.
        #[arg(long)]
        ti2v: bool,
        /// With --coop: more matmul shapes to time on both kernels, `MxKxN` or `MxKxNt` (b transposed), comma-separated.
        #[arg(long, value_delimiter = ',', env = "MOTIF_COOP_SHAPES")]
        coop_shapes: Vec<String>,
    },
    /// Run a reference case set (motif-cases-v1) and report the error of every output.
    Conformance {
        /// The case set: a diffusers model folder with cases.json and cases.safetensors.
        dir: std::path::PathBuf,
        /// Only these components, comma-separated (tokenizer, text_encoder, unet, vae, scheduler, pipeline).
        #[arg(long, value_delimiter = ',')]
        component: Option<Vec<String>>,
        /// Also compare the cases' debug outputs, to locate where an error starts.
        #[arg(long)]
        debug: bool,
    },
    /// Serve the community gallery (/) and the HTTP API (/api/v1) with a job queue and in-process GPU workers; clips and the SQLite database go to --data.
    Serve(Box<serve::ServeArgs>),
    /// Run GPU workers on the job queue of a `motif serve --database postgres://...`.
    Worker(Box<serve::WorkerArgs>),
    /// Motif's Discord app: `register` its slash commands (docs/DISCORD.md).
    Discord {
        #[command(subcommand)]
        command: discord::DiscordCommand,
    },
    /// Server administration: API tokens and gallery members.
    Admin {
        #[command(subcommand)]
        command: serve::AdminCommand,
    },
}

fn parse_workload(s: &str) -> Result<(usize, usize, usize), String> {
    let parts: Vec<usize> = s
        .split('x')
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("expected WIDTHxHEIGHTxFRAMES such as 512x512x16, found `{s}`"))?;
    match parts[..] {
        [w, h, f] if w % 8 == 0 && h % 8 == 0 && w > 0 && h > 0 && f > 0 => Ok((w, h, f)),
        [_, _, _] => Err(format!(
            "`{s}`: width and height must be positive multiples of 8, frames at least 1"
        )),
        _ => Err(format!(
            "expected WIDTHxHEIGHTxFRAMES such as 512x512x16, found `{s}`"
        )),
    }
}

fn parse_precision(s: &str) -> Result<DType, String> {
    s.parse()
}

fn open_gpu(cli: &Cli) -> Result<Gpu> {
    Gpu::new(GpuOptions {
        adapter: cli.adapter.clone(),
        precision: cli.precision,
        ..Default::default()
    })
    .context("opening the GPU")
}

fn mib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// A size for the listing: small files (LoRAs, test models) in KiB.
fn size_on_disk(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{:.0} KiB", bytes as f64 / 1024.0)
    } else {
        mib(bytes)
    }
}

fn info(cli: &Cli) -> Result<()> {
    println!("motif {}", env!("CARGO_PKG_VERSION"));
    let adapters = gpu::list_adapters();
    println!("adapters:");
    if adapters.is_empty() {
        println!("  (none)");
    }
    for a in &adapters {
        println!("  {a}");
    }
    let gpu = open_gpu(cli)?;
    let info = gpu.adapter_info();
    let limits = gpu.limits();
    let has = |f| {
        if gpu.features().contains(f) {
            "yes"
        } else {
            "no"
        }
    };
    println!("chosen: {}", gpu.adapter());
    println!(
        "  precision: {} ({})",
        gpu.precision(),
        if cli.precision.is_some() {
            "requested"
        } else if gpu.adapter().is_cpu {
            "default on CPU adapters"
        } else {
            "default"
        }
    );
    println!(
        "  SHADER_F16: {}",
        has(motif_engine::wgpu::Features::SHADER_F16)
    );
    println!(
        "  SUBGROUP: {} (size {}..{})",
        has(motif_engine::wgpu::Features::SUBGROUP),
        info.subgroup_min_size,
        info.subgroup_max_size
    );
    println!(
        "  TIMESTAMP_QUERY: {}",
        has(motif_engine::wgpu::Features::TIMESTAMP_QUERY)
    );
    match gpu.pipeline_cache_path() {
        Some(p) => println!("  pipeline cache: {}", p.display()),
        None => println!(
            "  pipeline cache: none (the backend has no PIPELINE_CACHE, or MOTIF_CACHE_DIR=off)"
        ),
    }
    println!(
        "  largest storage binding: {}",
        mib(limits.max_storage_buffer_binding_size)
    );
    println!("  largest buffer: {}", mib(limits.max_buffer_size));
    println!(
        "  storage buffers per stage: {}",
        limits.max_storage_buffers_per_shader_stage
    );
    println!(
        "  workgroup: {} invocations, {}x{}x{}, {} KiB shared memory",
        limits.max_compute_invocations_per_workgroup,
        limits.max_compute_workgroup_size_x,
        limits.max_compute_workgroup_size_y,
        limits.max_compute_workgroup_size_z,
        limits.max_compute_workgroup_storage_size / 1024
    );
    println!(
        "  workgroups per dimension: {}",
        limits.max_compute_workgroups_per_dimension
    );
    Ok(())
}

/// `motif bench --tune`: the tuner over the models' shape classes; writes
/// the adapter's tuning file and prints one line per trial (or JSON).
fn bench_tune(cli: &Cli, iters: usize, json: bool, seconds: Option<u64>) -> Result<()> {
    use motif_engine::gpu::tuning;
    let gpu = open_gpu(cli)?;
    let dtype = gpu.precision();
    let path = tuning::path_for(&gpu.adapter_info(), gpu.options().pipeline_cache.clone())
        .context("no cache folder for the tuning file: set MOTIF_CACHE_DIR")?;
    eprintln!(
        "adapter: {} ({dtype}); tuning file {}",
        gpu.adapter(),
        path.display()
    );
    let shapes = motif_engine::tune::model_classes(&gpu);
    let budget = seconds.map(std::time::Duration::from_secs);
    let (reports, tuning) = motif_engine::tune::tune(&gpu, &shapes, dtype, iters, budget, &mut |r| {
        eprintln!("{} {} ({}):", r.op, r.class, r.shape);
        for t in &r.trials {
            let verdict = match (&t.error, t.correct) {
                (Some(e), _) => format!("failed: {e}"),
                (None, true) => "ok".to_string(),
                (None, false) => "WRONG".to_string(),
            };
            eprintln!(
                "  {:<28} {:>10.3} ms {:>8.2} TFLOP/s  err {:.2e}/{:.2e} vs portable {:.2e}/{:.2e}  {verdict}",
                t.variant.describe(),
                t.ms,
                t.tflops,
                t.small_error,
                t.small_tolerance,
                t.large_error,
                t.large_tolerance
            );
        }
        match &r.chosen {
            Some(v) => eprintln!("  chosen: {}", v.describe()),
            None => eprintln!("  chosen: none (no variant computed right): defaults stay"),
        }
    })
    .context("tuning")?;
    tuning.save(&path).context("writing the tuning file")?;
    eprintln!("wrote {}", path.display());
    if json {
        println!("{}", serde_json::to_string(&reports)?);
    }
    Ok(())
}

/// `motif bench --wan`: one Wan2.1-1.3B denoising step with random weights,
/// timed (JSON with `--json`: `step_s` and the slowest kernels).
fn bench_wan(
    cli: &Cli,
    size: Option<(usize, usize, usize)>,
    iters: usize,
    json: bool,
    layers: Option<usize>,
) -> Result<()> {
    let gpu = open_gpu(cli)?;
    let (width, height, frames) = size.unwrap_or((832, 480, 81));
    eprintln!(
        "adapter: {}; Wan2.1-T2V-1.3B step at {width}x{height}x{frames} in {}, random weights",
        gpu.adapter(),
        gpu.precision()
    );
    let (seconds, kernels) =
        motif_engine::bench::bench_wan_step(&gpu, width, height, frames, iters, layers)
            .context("benchmarking the Wan step")?;
    if json {
        let kernels: Vec<_> = kernels
            .iter()
            .take(12)
            .map(|k| serde_json::json!({"kernel": k.kernel, "s": k.seconds, "dispatches": k.dispatches}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"step_s": seconds, "size": [width, height, frames], "kernels": kernels})
        );
    } else {
        println!("step (two transformer passes): {:.3} s", seconds);
        for k in kernels.iter().take(12) {
            println!(
                "  {:<28} {:>9.3} ms  {:>6} dispatches",
                k.kernel,
                k.seconds * 1e3,
                k.dispatches
            );
        }
    }
    Ok(())
}

/// `motif bench --plan --wan-i2v`: the peak device memory of a
/// Wan2.1-I2V-14B generation with its image encoder by phase, walked
/// through the allocator. `MOTIF_MAX_BINDING_BYTES` plans for an adapter
/// whose storage bindings are larger than this one's.
fn plan_wan_i2v(cli: &Cli, size: Option<(usize, usize, usize)>) -> Result<()> {
    let gpu = Gpu::new(
        GpuOptions {
            adapter: cli.adapter.clone(),
            precision: cli.precision,
            plan: true,
            ..Default::default()
        }
        .with_env()?,
    )
    .context("opening the GPU")?;
    let (width, height, frames) = size.unwrap_or((832, 480, 81));
    println!("adapter: {}", gpu.adapter());
    println!(
        "Wan2.1-I2V-14B with CLIP ViT-H at {width}x{height}x{frames} in {} (plan: nothing runs, every allocation is counted)",
        gpu.precision()
    );
    let r = motif_engine::bench::plan_wan_i2v(&gpu, width, height, frames)?;
    let rows = [
        (
            "resident weights (transformer, VAE, image encoder)",
            r.wan.weight_bytes,
        ),
        (
            "peak, text encoding (UMT5-XXL streamed)",
            r.wan.text_encoding_peak,
        ),
        ("peak, conditioning (CLIP, VAE encode)", r.conditioning_peak),
        (
            "peak, denoising (one step, guidance on)",
            r.wan.denoising_peak,
        ),
        ("peak, decoding", r.wan.decoding_peak),
        ("peak device memory", r.peak()),
    ];
    for (what, bytes) in rows {
        println!("{what:<52} {}", mib(bytes));
    }
    Ok(())
}

/// `motif bench --plan --wan`: the peak device memory of a Wan2.1-1.3B
/// generation by phase, walked through the allocator.
fn plan_wan(cli: &Cli, size: Option<(usize, usize, usize)>, ti2v: bool) -> Result<()> {
    let gpu = Gpu::new(GpuOptions {
        adapter: cli.adapter.clone(),
        precision: cli.precision,
        plan: true,
        ..Default::default()
    })
    .context("opening the GPU")?;
    use motif_engine::bench::WanPlanModel;
    let (model, name, default) = match ti2v {
        true => (
            WanPlanModel::Ti2v5B,
            "Wan2.2-TI2V-5B (image-to-video)",
            (1280, 704, 121),
        ),
        false => (WanPlanModel::T2v1_3B, "Wan2.1-T2V-1.3B", (832, 480, 81)),
    };
    let (width, height, frames) = size.unwrap_or(default);
    println!("adapter: {}", gpu.adapter());
    println!(
        "{name} at {width}x{height}x{frames} in {} (plan: nothing runs, every allocation is counted)",
        gpu.precision()
    );
    let r = motif_engine::bench::plan_wan_model(&gpu, model, width, height, frames)?;
    println!(
        "resident weights (transformer, VAE):  {}",
        mib(r.weight_bytes)
    );
    println!(
        "peak, text encoding (UMT5-XXL streamed): {}",
        mib(r.text_encoding_peak)
    );
    println!(
        "peak, denoising (one step, guidance on): {}",
        mib(r.denoising_peak)
    );
    println!(
        "peak, decoding:                          {}",
        mib(r.decoding_peak)
    );
    println!("peak device memory:                      {}", mib(r.peak()));
    Ok(())
}

fn bench_unet(
    cli: &Cli,
    plan: bool,
    size: Option<(usize, usize, usize)>,
    iters: usize,
) -> Result<()> {
    let gpu = Gpu::new(GpuOptions {
        adapter: cli.adapter.clone(),
        precision: cli.precision,
        plan,
        ..Default::default()
    })
    .context("opening the GPU")?;
    println!("adapter: {}", gpu.adapter());
    let mut w = if plan || !gpu.adapter().is_cpu {
        motif_engine::bench::UNetBench::full_size()
    } else {
        println!("CPU adapter: running the reduced workload (pass --size 512x512x16 for the full one, or --plan for its memory)");
        motif_engine::bench::UNetBench::reduced()
    };
    if let Some((width, height, frames)) = size {
        w.width = width;
        w.height = height;
        w.frames = frames;
    }
    println!(
        "workload: SD1.5 UNet + AnimateDiff v2 motion modules (random weights), {}x{}, {} frames, batch {}, {}{}",
        w.width, w.height, w.frames, w.batch, gpu.precision(), if plan { ", plan only" } else { "" }
    );
    let report =
        motif_engine::bench::bench_unet(&gpu, &w, iters).context("benchmarking the UNet")?;
    if let Some(ms) = report.ms_per_step {
        println!("ms per step: {ms:.1} (wall)");
    }
    if let Some(ms) = report.gpu_ms_per_step {
        println!("ms per step: {ms:.1} (GPU timestamps)");
    }
    println!("weights: {}", mib(report.weight_bytes));
    println!("peak GPU memory (pool): {}", mib(report.peak_bytes));
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn bench_model(
    cli: &Cli,
    model: &str,
    size: Option<(usize, usize, usize)>,
    steps: &[usize],
    guidance: f32,
    prompt: &str,
    iters: usize,
    json: bool,
) -> Result<()> {
    if steps.contains(&0) {
        anyhow::bail!("--steps: every step count must be at least 1");
    }
    let name = catalog::resolve_model_name(model).with_context(|| format!("--model {model}"))?;
    let mut spec = motif_engine::models::source::ModelSpec {
        model: name.clone(),
        ..Default::default()
    };
    // `motif bench` takes --model only: a Wan transformer file runs with
    // the text encoder and VAE of the models folder that fit it.
    for (flag, picked, path) in catalog::companions(std::path::Path::new(&name), true, true, true)
        .with_context(|| format!("--model {model}"))?
    {
        eprintln!(
            "{}: using {picked} ({}), the only one in the models folder that fits",
            flag.name(),
            path.display()
        );
        let path = Some(path.to_string_lossy().into_owned());
        match flag {
            catalog::Flag::TextEncoder => spec.text_encoder = path,
            catalog::Flag::ImageEncoder => spec.image_encoder = path,
            _ => spec.vae = path,
        }
    }
    let source = motif_engine::models::source::ModelSource::open(&spec)
        .with_context(|| format!("--model {model}: opening the model"))?;
    let gpu = open_gpu(cli)?;
    let w = motif_engine::bench::PipelineBench {
        prompt: prompt.to_string(),
        size,
        steps: steps.to_vec(),
        guidance,
        iters: iters.max(1),
    };
    eprintln!("adapter: {} ({})", gpu.adapter(), gpu.precision());
    eprintln!(
        "workload: {}, guidance {guidance}, steps {steps:?}",
        source.path().display()
    );
    let report =
        motif_engine::bench::bench_pipeline(&gpu, &source, &w, &mut |line| eprintln!("  {line}"))
            .context("benchmarking the model")?;
    if json {
        let mut v = serde_json::to_value(&report)?;
        v["adapter"] = serde_json::json!(gpu.adapter().to_string());
        v["precision"] = serde_json::json!(gpu.precision().to_string());
        v["workload"] = serde_json::json!({"width": report.width, "height": report.height, "frames": report.frames, "guidance": guidance});
        println!("{v}");
    } else {
        println!("weights: {}", mib(report.weight_bytes));
        println!("peak GPU memory (pool): {}", mib(report.peak_bytes));
    }
    Ok(())
}

fn bench(cli: &Cli, ops: bool, iters: usize, all_precisions: bool) -> Result<()> {
    if !ops {
        anyhow::bail!("nothing to benchmark: pass --ops and/or --unet");
    }
    if iters == 0 {
        anyhow::bail!("--iters must be at least 1");
    }
    let gpu = open_gpu(cli)?;
    println!("adapter: {}", gpu.adapter());
    let dtypes = if all_precisions {
        if gpu.has_f16() {
            vec![DType::F32, DType::F16]
        } else {
            vec![DType::F32]
        }
    } else {
        vec![gpu.precision()]
    };
    println!(
        "{:<40} {:>5} {:>10} {:>10} {:>12}  timer",
        "case", "dtype", "ms", "wall ms", "rate"
    );
    for dtype in dtypes {
        motif_engine::bench::bench_ops(&gpu, dtype, iters, |r| {
            let (rate, unit) = r.rate();
            println!(
                "{:<40} {:>5} {:>10.2} {:>10.2} {:>6.1} {:<7} {}",
                r.name,
                r.dtype,
                r.seconds * 1e3,
                r.wall_seconds * 1e3,
                rate,
                unit,
                if r.gpu_timed { "gpu" } else { "wall" }
            );
        })
        .with_context(|| format!("benchmarking in {dtype}"))?;
    }
    let stats = gpu.pool_stats();
    println!(
        "peak GPU memory (pool): {}",
        mib(stats.peak_allocated_bytes)
    );
    Ok(())
}

/// `motif bench --coop`: one line per case of the tensor-core matmul check;
/// false if a case failed. An adapter without cooperative matrices is no
/// failure: it says so and passes.
fn bench_coop(cli: &Cli, shapes: &[String]) -> Result<bool> {
    let gpu = open_gpu(cli)?;
    println!("adapter: {}", gpu.adapter());
    let Some(config) = gpu.coop_matrix() else {
        println!(
            "no cooperative matrices (f16 x f16 -> f32 16x16x16) on this adapter, or MOTIF_NO_COOP is set: \
             nothing to check"
        );
        return Ok(true);
    };
    println!(
        "cooperative matrices: subgroup size {}, reported: {}",
        config.subgroup_size,
        config.reported.join(", ")
    );
    let cases = bench_coop::coop_check(&gpu, shapes)?;
    println!(
        "{:<38} {:<40} {:>10} {:>10} {:>10} {:>5} {:>9} {:>8}  timer",
        "case", "shape", "max err", "tolerance", "vs tiled", "ok", "ms", "TFLOP/s"
    );
    let mut all_passed = true;
    for c in &cases {
        all_passed &= c.passed;
        println!(
            "{:<38} {:<40} {:>10.3e} {:>10.3e} {:>10.3e} {:>5} {:>9.3} {:>8.2}  {}",
            c.name,
            c.shape,
            c.max_error,
            c.tolerance,
            c.vs_portable,
            if c.passed { "pass" } else { "FAIL" },
            c.ms,
            c.tflops,
            if c.gpu_timed { "gpu" } else { "wall" }
        );
        if let Some(e) = &c.error {
            println!("    error: {e}");
        }
    }
    Ok(all_passed)
}

fn conformance(
    cli: &Cli,
    dir: &std::path::Path,
    component: Option<Vec<String>>,
    debug: bool,
) -> Result<bool> {
    let gpu = open_gpu(cli)?;
    eprintln!("adapter: {} ({})", gpu.adapter(), gpu.precision());
    let opts = motif_engine::conformance::ConformanceOptions {
        components: component,
        debug,
    };
    let summary = motif_engine::conformance::run(&gpu, dir, &opts, |line| match line {
        motif_engine::conformance::Line::Output {
            case,
            output,
            max_abs_err,
            tolerance,
            budget,
            ok,
        } => println!(
            "{case}  {output}  {max_abs_err:.3e}  {tolerance:.3e} ({budget})  {}",
            if *ok { "ok" } else { "FAIL" }
        ),
        motif_engine::conformance::Line::CaseError { case, error } => {
            println!("{case}  (case)  -  -  FAIL: {error}")
        }
    })
    .with_context(|| format!("running the case set in {}", dir.display()))?;
    println!("{} passed, {} failed", summary.passed, summary.failed);
    Ok(summary.failed == 0 && summary.passed > 0)
}

fn list_styles() -> Result<()> {
    for s in catalog::styles()? {
        println!("{:<12} {}", s.name, s.description);
    }
    Ok(())
}

fn list_models() -> Result<()> {
    let models = catalog::list_models();
    if models.is_empty() {
        println!("no models found.");
    }
    for m in &models {
        println!(
            "{:<40} {:<18} {:<14} {:>9}  {}",
            m.name,
            m.source,
            m.family,
            size_on_disk(m.bytes),
            m.kind
        );
        println!("{:<40} {}", "", m.path.display());
    }
    match catalog::models_dir() {
        Some(dir) => println!(
            "\nmodels folder: {} (set MOTIF_MODELS to change it)",
            dir.display()
        ),
        None => println!("\nmodels folder: none (set MOTIF_MODELS)"),
    }
    Ok(())
}

/// Opens the chosen GPU on demand, from the server's worker threads.
fn gpu_opener(cli: &Cli) -> Box<dyn Fn() -> Result<Gpu> + Send + Sync> {
    let (adapter, precision) = (cli.adapter.clone(), cli.precision);
    Box::new(move || {
        Gpu::new(GpuOptions {
            adapter: adapter.clone(),
            precision,
            ..Default::default()
        })
        .context("opening the GPU")
    })
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Generate(args) => generate::run(|| open_gpu(&cli), args),
        Command::View(args) => match view::run(|| open_gpu(&cli), args) {
            Ok(0) => Ok(()),
            Ok(code) => std::process::exit(code),
            Err(e) => Err(e),
        },
        Command::Styles => list_styles(),
        Command::Models => list_models(),
        Command::Info => info(&cli),
        Command::Bench {
            ops,
            iters,
            all_precisions,
            unet,
            plan,
            wan,
            wan_i2v,
            size,
            model,
            steps,
            guidance,
            prompt,
            json,
            coop,
            coop_shapes,
            tune,
            tune_seconds,
            wan_layers,
            ti2v,
        } => {
            if *tune {
                bench_tune(&cli, *iters, *json, *tune_seconds)
            } else if *coop {
                match bench_coop(&cli, coop_shapes) {
                    Ok(true) => Ok(()),
                    // The report already said which case failed.
                    Ok(false) => std::process::exit(1),
                    Err(e) => Err(e),
                }
            } else if let Some(model) = model {
                bench_model(&cli, model, *size, steps, *guidance, prompt, *iters, *json)
            } else if *wan_i2v {
                plan_wan_i2v(&cli, *size)
            } else if *wan {
                if *plan {
                    plan_wan(&cli, *size, *ti2v)
                } else {
                    bench_wan(&cli, *size, *iters, *json, *wan_layers)
                }
            } else if *plan && !*unet {
                Err(anyhow::anyhow!("--plan goes with --unet or --wan"))
            } else if *unet {
                let r = if *ops {
                    bench(&cli, true, *iters, *all_precisions)
                } else {
                    Ok(())
                };
                r.and_then(|_| bench_unet(&cli, *plan, *size, *iters))
            } else {
                bench(&cli, *ops, *iters, *all_precisions)
            }
        }
        Command::Conformance {
            dir,
            component,
            debug,
        } => match conformance(&cli, dir, component.clone(), *debug) {
            Ok(true) => Ok(()),
            // The report already said what failed.
            Ok(false) => std::process::exit(1),
            Err(e) => Err(e),
        },
        Command::Serve(args) => serve::serve(gpu_opener(&cli), args),
        Command::Worker(args) => serve::worker(gpu_opener(&cli), args),
        Command::Admin { command } => serve::admin(command),
        Command::Discord { command } => discord::run(command),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
