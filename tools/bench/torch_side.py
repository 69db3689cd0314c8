"""The PyTorch side of Motif's side-by-side benchmark: diffusers'
AnimateDiffPipeline (UNetMotionModel, AutoencoderKL, CLIPTextModel) on the
same diffusers folder that `motif bench --model DIR` loads, taken apart into
the same parts and timed the same way:

    load                 from_pretrained(...).to(device)
    first preview, cold  from the start of loading to the end of the first
                         denoising step of the first generation, with that
                         step's latents projected to RGB and on the CPU
    clip encode          both prompts (negative, positive) through the text
                         encoder
    unet step            one UNetMotionModel forward at batch 2 (guidance)
    vae decode           every frame through the decoder, in one batch as the
                         pipeline decodes them (decode_chunk_size 16)
    generate N steps     the whole pipeline call, decoded frames on the CPU
    first preview, warm  from the pipeline call to the end of its first step

Eager PyTorch with SDPA attention (diffusers' default processor), no
torch.compile; fp16 on CUDA, fp32 on the CPU. Every timed region ends with a
device synchronisation. Peak memory: torch.cuda.max_memory_allocated on CUDA;
on the CPU the caller (compare.py) takes the process's peak resident memory.

    python3 tools/bench/torch_side.py --model assets/models/default --json
    # a random-weight SD1.5 + AnimateDiff v2 motion module model, full size:
    python3 tools/bench/torch_side.py --make-full /tmp/full
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

# Stable Diffusion 1.5's UNet, VAE and CLIP ViT-L/14 text encoder, and the
# AnimateDiff v2 motion adapter: the published configs' structural fields.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
ADAPTER_V2 = dict(
    block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2,
    motion_mid_block_layers_per_block=1, motion_norm_num_groups=32,
    motion_num_attention_heads=8, motion_max_seq_length=32, use_motion_mid_block=True,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    projection_dim=768,
)
ANIMATEDIFF_DDIM = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
    num_train_timesteps=1000, set_alpha_to_one=True, steps_offset=1,
    timestep_spacing="linspace", prediction_type="epsilon",
)
# SD's widely used latent -> RGB fit, as Motif's preview uses it.
SD_LATENT_RGB = [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350],
                 [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]


def make_full(out, seed=0):
    """Writes a random-weight SD1.5 + motion adapter v2 model (fp16, the
    diffusers folder layout) that both sides load."""
    from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    with torch.device(device):
        unet2d = UNet2DConditionModel(**SD15_UNET)
        adapter = MotionAdapter(**ADAPTER_V2)
        unet = UNetMotionModel.from_unet2d(unet2d, adapter)
        del unet2d, adapter
        unet.half().save_pretrained(out / "unet", safe_serialization=True)
        del unet
        AutoencoderKL(**SD_VAE).half().save_pretrained(out / "vae", safe_serialization=True)
        CLIPTextModel(CLIPTextConfig(**CLIP_L)).half().save_pretrained(
            out / "text_encoder", safe_serialization=True)
    DDIMScheduler(**ANIMATEDIFF_DDIM).save_pretrained(out / "scheduler")
    shutil.copytree(ROOT / "assets" / "clip_tokenizer", out / "tokenizer")
    import diffusers
    json.dump({
        "_class_name": "AnimateDiffPipeline", "_diffusers_version": diffusers.__version__,
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNetMotionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }, open(out / "model_index.json", "w"), indent=1)
    print(f"wrote {out} in {time.time() - t0:.1f} s", file=sys.stderr)


def matmul(device, n=4096, iters=20):
    """The product Motif's `bench --coop` measures, through cuBLAS."""
    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync()
    s = (time.perf_counter() - t) / iters
    print(f"torch matmul {n}x{n}x{n} {str(dtype).replace('torch.', '')} on {device}: "
          f"{s * 1e3:.3f} ms, {2 * n**3 / s / 1e12:.1f} TFLOP/s")


def attention(device, iters=10):
    """SDPA at the two attention shapes `motif bench --tune` times: SD's 4,096
    tokens of 8 heads x 40, and Wan2.1-1.3B's 32,760 tokens (832x480x81) of 12
    heads x 128. Prints {"4096": ms, "32760": ms} as JSON."""
    import torch.nn.functional as F
    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    out = {}
    for tokens, heads, d in [(4096, 8, 40), (32760, 12, 128)]:
        if dev.type != "cuda" and tokens > 4096:
            continue
        q, k, v = (torch.randn(1, heads, tokens, d, device=dev, dtype=dtype) for _ in range(3))
        with torch.inference_mode():
            F.scaled_dot_product_attention(q, k, v)
            sync()
            t = time.perf_counter()
            for _ in range(iters):
                F.scaled_dot_product_attention(q, k, v)
            sync()
        out[str(tokens)] = (time.perf_counter() - t) / iters * 1e3
    print(json.dumps(out))


# Wan2.1-T2V-1.3B's transformer config (engine/src/bench.rs's WAN21_1_3B_TRANSFORMER).
WAN21_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def wan_step(device, size, iters=1, layers=None):
    """One Wan2.1-1.3B denoising step with random weights (two transformer
    passes: prompt and negative prompt), as `motif bench --wan` times it
    (`layers` as its --wan-layers: fewer blocks for a dry run).
    Prints {"step_s": seconds} as JSON."""
    from diffusers import WanTransformer3DModel
    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    width, height, frames = size
    torch.manual_seed(0)
    config = dict(WAN21_1_3B, num_layers=layers or WAN21_1_3B["num_layers"])
    # Built where it runs: a CPU initialisation of 1.3B random weights
    # takes a good part of the GPU run's time limit.
    with dev:
        model = WanTransformer3DModel(**config).to(dtype).eval()
    latents = torch.randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, device=dev, dtype=dtype)
    context = torch.randn(1, 512, 4096, device=dev, dtype=dtype)
    t = torch.tensor([999], device=dev)

    def step():
        for _ in range(2):
            model(latents, t, context, return_dict=False)

    with torch.inference_mode():
        step()
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            step()
        sync()
    print(json.dumps({"step_s": (time.perf_counter() - start) / iters, "size": [width, height, frames]}))


def parse_size(s):
    w, h, f = (int(x) for x in s.lower().split("x"))
    return w, h, f


def model_defaults(model):
    card = Path(model) / "motif.json"
    d = json.load(open(card)).get("defaults", {}) if card.is_file() else {}
    return d.get("width", 512), d.get("height", 512), d.get("frames", 16)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a diffusers AnimateDiff folder (unet/ holding a UNetMotionModel)")
    ap.add_argument("--make-full", metavar="DIR", help="write the random-weight full-size model to DIR and exit")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp16", "fp32"], help="default: fp16 on CUDA, fp32 on the CPU")
    ap.add_argument("--size", type=parse_size, help="WIDTHxHEIGHTxFRAMES (default: the model card's, else 512x512x16)")
    ap.add_argument("--steps", default="4,25", help="step counts of the whole generations")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--prompt", default="a yellow star spinning over the sea at night")
    ap.add_argument("--iters", type=int, default=2, help="repetitions of each part after a warm-up")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    ap.add_argument("--matmul", action="store_true", help="time a 4096x4096x4096 product (fp16 on CUDA, fp32 on the CPU) and exit")
    ap.add_argument("--attention", action="store_true", help="time SDPA at 4,096 and 32,760 tokens (JSON) and exit")
    ap.add_argument("--wan-step", action="store_true", help="time one Wan2.1-1.3B step, random weights, at --size (default 832x480x81; JSON) and exit")
    ap.add_argument("--wan-layers", type=int, help="with --wan-step: this many transformer blocks instead of 30 (as motif bench --wan-layers)")
    args = ap.parse_args()
    if args.attention:
        attention(args.device)
        return
    if args.wan_step:
        wan_step(args.device, args.size or (832, 480, 81), max(1, args.iters), args.wan_layers)
        return
    if args.matmul:
        matmul(args.device)
        return
    if args.make_full:
        make_full(args.make_full)
        return
    if not args.model:
        ap.error("--model or --make-full is required")
    report = run(args)
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"{k}: {v}")


def run(args):
    from diffusers import AnimateDiffPipeline

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.dtype or ("fp16" if cuda else "fp32")]
    width, height, frames = args.size or model_defaults(args.model)
    steps_list = [int(s) for s in args.steps.split(",") if s]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def say(line):
        print(f"  {line}", file=sys.stderr, flush=True)

    def time_it(fn):
        with torch.inference_mode():
            fn()
            sync()
            t = time.perf_counter()
            for _ in range(max(1, args.iters)):
                fn()
            sync()
        return (time.perf_counter() - t) / max(1, args.iters)

    rgb = torch.tensor(SD_LATENT_RGB, device=dev, dtype=torch.float32)

    def preview(latents):
        # [B, C, F, h, w] -> RGB8 frames on the CPU, as Motif's preview event.
        x = latents[0].float().permute(1, 2, 3, 0) @ rgb[: latents.shape[1]]
        return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu()

    report = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu",
              "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
              "threads": torch.get_num_threads(),
              "workload": {"width": width, "height": height, "frames": frames, "guidance": args.guidance}}
    t0 = time.perf_counter()
    pipe = AnimateDiffPipeline.from_pretrained(args.model, dtype=dtype).to(dev)
    pipe.set_progress_bar_config(disable=True)
    sync()
    report["load_s"] = time.perf_counter() - t0
    say(f"load: {report['load_s']:.2f} s")

    def generate(steps, start):
        first = []

        def on_step(p, i, t, kw):
            if not first:
                preview(kw["latents"])
                first.append(time.perf_counter() - start)
            return kw

        with torch.inference_mode():
            pipe(prompt=args.prompt, negative_prompt="", num_frames=frames, height=height, width=width,
                 num_inference_steps=steps, guidance_scale=args.guidance, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(0),
                 callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"])
        sync()
        return first[0] if first else float("nan")

    report["first_preview_cold_s"] = generate(min(steps_list), t0)
    say(f"first preview, cold (from load): {report['first_preview_cold_s']:.2f} s")

    cfg = args.guidance > 1.0
    report["clip_encode_s"] = time_it(lambda: pipe.encode_prompt(
        args.prompt, dev, 1, cfg, negative_prompt=""))
    say(f"clip encode: {report['clip_encode_s']:.3f} s")

    h, w = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
    g = torch.Generator("cpu").manual_seed(31)
    sample = torch.randn(2, 4, frames, h, w, generator=g).to(dev, dtype)
    dim = pipe.text_encoder.config.hidden_size
    # The pipeline repeats each prompt's states per frame before the UNet.
    context = torch.randn(2, 77, dim, generator=g).to(dev, dtype).repeat_interleave(frames, dim=0)
    t = torch.tensor([501], device=dev)
    report["unet_step_s"] = time_it(lambda: pipe.unet(sample, t, encoder_hidden_states=context).sample)
    say(f"unet step: {report['unet_step_s']:.3f} s")

    latents = torch.randn(frames, 4, h, w, generator=g).to(dev, dtype)
    report["vae_decode_s"] = time_it(
        lambda: pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample)
    say(f"vae decode ({frames} frames): {report['vae_decode_s']:.3f} s")

    report["generate_s"] = []
    for steps in steps_list:
        start = time.perf_counter()
        first = generate(steps, start)
        total = time.perf_counter() - start
        if "first_preview_warm_s" not in report:
            report["first_preview_warm_s"] = first
            say(f"first preview, warm: {first:.3f} s")
        report["generate_s"].append([steps, total])
        say(f"generate, {steps} steps: {total:.2f} s")
    if cuda:
        report["peak_bytes"] = torch.cuda.max_memory_allocated(dev)
    return report


if __name__ == "__main__":
    main()
