//! `motif`: the command-line front end. It parses arguments, shows progress
//! and calls into the engine; no model or GPU logic lives here.

mod catalog;
mod generate;
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
        /// With --unet: the workload as WIDTHxHEIGHTxFRAMES (default 512x512x16 on GPUs, 128x128x4 on CPU adapters and always 512x512x16 with --plan).
        #[arg(long, value_parser = parse_workload)]
        size: Option<(usize, usize, usize)>,
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
    /// Serve the HTTP API (/api/v1) with a job queue and in-process GPU workers; clips and the SQLite database go to --data.
    Serve(Box<serve::ServeArgs>),
    /// Run GPU workers on the job queue of a `motif serve --database postgres://...`.
    Worker(Box<serve::WorkerArgs>),
    /// Server administration: API tokens.
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
            "{:<40} {:<18} {:>9}  {}",
            m.name,
            m.source,
            mib(m.bytes),
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
    if catalog::default_model().is_none() {
        println!("bundled default: none in this build yet");
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
            size,
        } => {
            if *plan && !*unet {
                Err(anyhow::anyhow!("--plan goes with --unet"))
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
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
