"""Trains Motif's bundled default model on the synthetic world (world.py).

Two stages, each bounded by wall-clock time so that a run fits in a lease of
a GPU machine or a background chunk on a CPU, and each resumable:

  vae   AutoencoderKL on single frames (L1 + L2 + image-gradient L1 + a
        small KL), then its latent scaling factor is measured.
  unet  UNetMotionModel and CLIPTextModel together, from scratch, on whole
        16-frame clips encoded by the frozen VAE: v-prediction on a
        zero-terminal-SNR schedule (Lin et al. 2023), min-SNR-5 weighting
        (Hang et al. 2023), 10 % empty and 5 % preset-negative captions
        for classifier-free guidance, an exponential moving average of the
        weights.

Outputs in --out: vae.safetensors, text_encoder.safetensors,
unet.safetensors (f16, the averaged weights), configs.json, log.txt,
sample.png (four held-out prompts sampled at the end) and, unless
--no-state, state-*.pt (full-precision weights and optimiser, for
--resume). `export.py` turns them into the diffusers folder that ships.

    python3 tools/train/train.py --out runs/full --device cuda \
        --vae-seconds 110 --unet-seconds 330              # one H100/H200
    python3 tools/train/train.py --out runs/cpu --device cpu --size 64 \
        --clips 2 --vae-seconds 600 --unet-seconds 3000   # CPU, smaller
"""

import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TOKENIZER = os.path.join(ROOT, "assets", "clip_tokenizer")

VAE_CFG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=128,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[32, 64, 64, 64], layers_per_block=1, norm_num_groups=16,
)
TE_CFG = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
    num_attention_heads=4, max_position_embeddings=77, projection_dim=64, hidden_act="quick_gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
UNET_CFG = dict(
    in_channels=4, out_channels=4, block_out_channels=[64, 96, 128], layers_per_block=1,
    down_block_types=["CrossAttnDownBlockMotion", "CrossAttnDownBlockMotion", "DownBlockMotion"],
    up_block_types=["UpBlockMotion", "CrossAttnUpBlockMotion", "CrossAttnUpBlockMotion"],
    cross_attention_dim=64, num_attention_heads=[2, 3, 4], norm_num_groups=16, use_linear_projection=True,
    motion_num_attention_heads=4, motion_max_seq_length=32, use_motion_mid_block=True,
)
SCHED_CFG = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing",
    clip_sample=False, set_alpha_to_one=True, steps_offset=0,
)


class Log:
    def __init__(self, out):
        self.f = open(os.path.join(out, "log.txt"), "a")
        self.t0 = time.time()

    def __call__(self, msg):
        line = f"[{time.time() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()


def lr_at(base, step, frac, warmup=100):
    """Linear warm-up, then cosine decay to 10 % over the time budget."""
    w = min(1.0, (step + 1) / warmup)
    return base * w * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def uncond(rng):
    """A classifier-free-guidance caption for 15 % of clips (10 % empty,
    5 % a preset's negative prompt), else None."""
    r = rng.random()
    if r < 0.10:
        return ""
    if r < 0.15:
        return rng.choice(world.UNCONDITIONAL[1:])
    return None


def save_f16(module_or_sd, path):
    from safetensors.torch import save_file
    sd = module_or_sd if isinstance(module_or_sd, dict) else module_or_sd.state_dict()
    tmp = path + ".tmp"
    save_file({k: v.detach().to("cpu", torch.float16).contiguous() for k, v in sd.items()}, tmp)
    os.replace(tmp, path)


def autocast(device):
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train_vae(a, log):
    from diffusers import AutoencoderKL
    dev = a.device
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    vae = AutoencoderKL(**dict(VAE_CFG, sample_size=a.size)).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=a.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, spent = 0, 0.0
    state = os.path.join(a.state_dir, "state-vae.pt")
    if a.resume and os.path.exists(state):
        s = torch.load(state, map_location=dev)
        vae.load_state_dict(s["model"]), opt.load_state_dict(s["opt"])
        step, spent = s["step"], s["spent"]
        rng.setstate(s["rng"])
        log(f"vae: resumed at step {step}, {spent:.0f}s spent")
    log(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters")
    t0 = time.time() - spent
    last_save = time.time()
    while time.time() - t0 < a.vae_seconds:
        frac = (time.time() - t0) / a.vae_seconds
        for g in opt.param_groups:
            g["lr"] = lr_at(a.vae_lr, step, frac)
        with torch.no_grad():
            clips, _, _ = world.make_batch(rng, a.vae_clips, frames=16, size=a.size, device=dev)
            pick = torch.randint(0, 16, (a.vae_clips, a.vae_frames), device=dev)
            x = torch.stack([clips[i, pick[i]] for i in range(a.vae_clips)]).flatten(0, 1) * 2 - 1
        with autocast(dev):
            post = vae.encode(x).latent_dist
            z = post.sample()
            rec = vae.decode(z).sample.float()
        l1 = (rec - x).abs().mean()
        l2 = F.mse_loss(rec, x)
        gx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
        gy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
        lg = (gx(rec) - gx(x)).abs().mean() + (gy(rec) - gy(x)).abs().mean()
        kl = post.kl().mean() / (x.shape[-1] * x.shape[-2])
        loss = l1 + l2 + 0.5 * lg + a.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            log(f"vae step {step}: l1 {l1.item():.4f} l2 {l2.item():.5f} grad {lg.item():.4f} kl {kl.item():.3f}")
        if time.time() - last_save > a.save_every:
            save_vae(a, vae, opt, step, time.time() - t0, rng, log)
            last_save = time.time()
    save_vae(a, vae, opt, step, time.time() - t0, rng, log)
    return vae


def measure_scaling(a, vae):
    rng = random.Random(a.seed + 1)
    zs = []
    with torch.no_grad(), autocast(a.device):
        for _ in range(4):
            clips, _, _ = world.make_batch(rng, 4, frames=16, size=a.size, device=a.device)
            zs.append(vae.encode(clips.flatten(0, 1) * 2 - 1).latent_dist.mean.float())
    z = torch.cat(zs)
    return float(1.0 / z.std()), float(z.mean())


def save_vae(a, vae, opt, step, spent, rng, log):
    scale, mean = measure_scaling(a, vae)
    vae.register_to_config(scaling_factor=scale)
    save_f16(vae, os.path.join(a.out, "vae.safetensors"))
    write_configs(a, vae=dict(vae.config))
    if not a.no_state:
        torch.save(dict(model=vae.state_dict(), opt=opt.state_dict(), step=step, spent=spent, rng=rng.getstate()),
                   os.path.join(a.state_dir, "state-vae.pt"))
    log(f"vae: saved at step {step}; latent std {1 / scale:.3f} mean {mean:.3f} -> scaling_factor {scale:.4f}")


def write_configs(a, **parts):
    path = os.path.join(a.out, "configs.json")
    cfg = json.load(open(path)) if os.path.exists(path) else {}
    for k, v in parts.items():
        cfg[k] = json.loads(json.dumps(v, default=list))
    cfg.setdefault("text_encoder", TE_CFG)
    cfg.setdefault("unet", UNET_CFG)
    cfg.setdefault("scheduler", SCHED_CFG)
    cfg.setdefault("train", {})
    json.dump(cfg, open(path, "w"), indent=1)


def load_vae(a):
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file
    cfg = json.load(open(os.path.join(a.out, "configs.json")))["vae"]
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    vae = AutoencoderKL(**cfg)
    vae.load_state_dict({k: v.float() for k, v in load_file(os.path.join(a.out, "vae.safetensors")).items()})
    return vae.to(a.device)


def train_unet(a, log, vae):
    from diffusers import DDPMScheduler, UNetMotionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    dev = a.device
    torch.manual_seed(a.seed + 2)
    rng = random.Random(a.seed + 2)
    tok = CLIPTokenizer.from_pretrained(TOKENIZER)
    te = CLIPTextModel(CLIPTextConfig(**TE_CFG)).to(dev)
    unet = UNetMotionModel(**UNET_CFG).to(dev)
    sched = DDPMScheduler(**{k: v for k, v in SCHED_CFG.items() if k not in ("set_alpha_to_one", "steps_offset")})
    vae.requires_grad_(False).eval()
    sf = vae.config.scaling_factor
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW([{"params": list(unet.parameters()), "lr": a.lr},
                             {"params": list(te.parameters()), "lr": a.lr}], betas=(0.9, 0.99), weight_decay=0.01)
    ema = [p.detach().clone().float() for p in params]
    step, spent = 0, 0.0
    state = os.path.join(a.state_dir, "state-unet.pt")
    if a.resume and os.path.exists(state):
        s = torch.load(state, map_location=dev)
        unet.load_state_dict(s["unet"]), te.load_state_dict(s["te"]), opt.load_state_dict(s["opt"])
        for e, v in zip(ema, s["ema"]):
            e.copy_(v)
        step, spent = s["step"], s["spent"]
        rng.setstate(s["rng"])
        log(f"unet: resumed at step {step}, {spent:.0f}s spent")
    if a.init and not (a.resume and os.path.exists(state)):
        from safetensors.torch import load_file
        unet.load_state_dict({k: v.float() for k, v in load_file(os.path.join(a.init, "unet.safetensors")).items()})
        te.load_state_dict({k: v.float() for k, v in load_file(os.path.join(a.init, "text_encoder.safetensors")).items()},
                           strict=False)
        for e, p in zip(ema, params):
            e.copy_(p.detach())
        log(f"unet: started from the averaged weights in {a.init}")
    log(f"unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, "
        f"text encoder {sum(p.numel() for p in te.parameters()) / 1e6:.2f}M")
    acp = sched.alphas_cumprod.to(dev)
    snr = acp / (1 - acp).clamp(min=1e-8)
    t0 = time.time() - spent
    last_save = time.time()
    ema_loss = None
    while time.time() - t0 < a.unet_seconds:
        frac = (time.time() - t0) / a.unet_seconds
        for g in opt.param_groups:
            g["lr"] = lr_at(a.lr, step, frac, warmup=200)
        with torch.no_grad():
            clips, caps, _ = world.make_batch(rng, a.clips, frames=a.frames, size=a.size, device=dev)
            with autocast(dev):
                lat = vae.encode(clips.flatten(0, 1) * 2 - 1).latent_dist.mean.float() * sf
            lat = lat.unflatten(0, (a.clips, a.frames)).permute(0, 2, 1, 3, 4)  # [B, C, F, h, w]
            caps = [uncond(rng) or c for c in caps]
            ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(dev)
            noise = torch.randn_like(lat)
            t = torch.randint(0, 1000, (a.clips,), device=dev)
            noisy = sched.add_noise(lat, noise, t)
            target = sched.get_velocity(lat, noise, t)
            w = (snr[t].clamp(max=5.0) / (snr[t] + 1)).view(-1, 1, 1, 1, 1)
        with autocast(dev):
            emb = te(ids).last_hidden_state
            pred = unet(noisy, t, encoder_hidden_states=emb.repeat_interleave(a.frames, 0)).sample
        loss = (w * (pred.float() - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(a.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - decay)
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if step % 50 == 0:
            log(f"unet step {step}: loss {ema_loss:.4f}, {step / (time.time() - t0):.2f} steps/s")
        if time.time() - last_save > a.save_every:
            save_unet(a, unet, te, opt, ema, params, step, time.time() - t0, rng, log)
            last_save = time.time()
    save_unet(a, unet, te, opt, ema, params, step, time.time() - t0, rng, log)
    return unet, te, tok


def ema_state(module, params, ema, offset):
    """The module's state dict with the averaged values in place of its parameters."""
    sd = dict(module.state_dict())
    names = [n for n, _ in module.named_parameters()]
    for i, n in enumerate(names):
        sd[n] = ema[offset + i]
    return sd, offset + len(names)


def save_unet(a, unet, te, opt, ema, params, step, spent, rng, log):
    usd, off = ema_state(unet, params, ema, 0)
    tsd, _ = ema_state(te, params, ema, off)
    save_f16(usd, os.path.join(a.out, "unet.safetensors"))
    save_f16(tsd, os.path.join(a.out, "text_encoder.safetensors"))
    cfg_path = os.path.join(a.out, "configs.json")
    train = json.load(open(cfg_path)).get("train", {}) if os.path.exists(cfg_path) else {}
    train.update(unet_steps=step, unet_seconds=round(spent), clips_per_step=a.clips, frames=a.frames,
                 size=a.size, device=torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu")
    write_configs(a, train=train)
    if not a.no_state:
        torch.save(dict(unet=unet.state_dict(), te=te.state_dict(), opt=opt.state_dict(), ema=ema,
                        step=step, spent=spent, rng=rng.getstate()), os.path.join(a.state_dir, "state-unet.pt"))
    log(f"unet: saved at step {step}")


@torch.no_grad()
def sample(a, log, vae, steps=12, guidance=5.0):
    """Held-out prompts through a plain DDIM loop, into sample.png."""
    from diffusers import DDIMScheduler, UNetMotionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from PIL import Image
    dev = a.device
    tok = CLIPTokenizer.from_pretrained(TOKENIZER)
    te = CLIPTextModel(CLIPTextConfig(**TE_CFG))
    te.load_state_dict({k: v.float() for k, v in load_file(os.path.join(a.out, "text_encoder.safetensors")).items()},
                       strict=False)
    unet = UNetMotionModel(**UNET_CFG)
    unet.load_state_dict({k: v.float() for k, v in load_file(os.path.join(a.out, "unet.safetensors")).items()})
    te, unet = te.to(dev).eval(), unet.to(dev).eval()
    sched = DDIMScheduler(**SCHED_CFG)
    sched.set_timesteps(steps)
    items = world.held_out_split()[::13] + [dict(colour="yellow", subject="star", action="spinning", scene="sea",
                                                  time="night", camera="static", style="flat", background="grey")]
    prompts = [world.caption(c) for c in items]
    n = len(prompts)
    ids = tok(prompts + [""] * n, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    emb = te(ids.to(dev)).last_hidden_state.repeat_interleave(16, 0)
    h = a.size // 8
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, 4, 16, h, h, generator=g).to(dev)
    for t in sched.timesteps:
        out = unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample
        c, u = out.chunk(2)
        x = sched.step(u + guidance * (c - u), t, x).prev_sample
    lat = x.permute(0, 2, 1, 3, 4).flatten(0, 1) / vae.config.scaling_factor
    img = torch.cat([vae.decode(lat[i:i + 16]).sample for i in range(0, lat.shape[0], 16)])
    img = ((img.float() / 2 + 0.5).clamp(0, 1) * 255).byte().unflatten(0, (n, 16))[:, ::3]
    sheet = img.permute(0, 3, 1, 4, 2).reshape(n * a.size, -1, 3).cpu().numpy()
    Image.fromarray(sheet).save(os.path.join(a.out, "sample.png"))
    for p in prompts:
        log(f"sample: {p}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for weights, configs and the log")
    ap.add_argument("--stage", choices=["vae", "unet", "all", "sample"], default="all")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=128, help="frame size in pixels")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--vae-seconds", type=float, default=110)
    ap.add_argument("--vae-clips", type=int, default=32, help="clips drawn per VAE step")
    ap.add_argument("--vae-frames", type=int, default=4, help="frames taken from each")
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--kl", type=float, default=1e-4, help="KL weight (per latent element, per pixel)")
    ap.add_argument("--unet-seconds", type=float, default=330)
    ap.add_argument("--clips", type=int, default=24, help="clips per UNet step")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=float, default=60, help="seconds between checkpoints")
    ap.add_argument("--state-dir", help="where resumable state goes (default: --out)")
    ap.add_argument("--resume", action="store_true", help="continue from the state in --state-dir")
    ap.add_argument("--init", help="start the UNet stage from the (f16, averaged) weights in this folder")
    ap.add_argument("--no-state", action="store_true", help="write no resumable state")
    a = ap.parse_args()
    a.state_dir = a.state_dir or a.out
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.state_dir, exist_ok=True)
    if a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    log = Log(a.out)
    log(f"args: {vars(a)}")
    log(f"torch {torch.__version__} on {a.device}"
        + (f" ({torch.cuda.get_device_name()})" if a.device.startswith("cuda") else f", {torch.get_num_threads()} threads"))
    if a.stage in ("vae", "all"):
        vae = train_vae(a, log)
    else:
        vae = load_vae(a)
    if a.stage in ("unet", "all"):
        train_unet(a, log, vae)
    if a.stage in ("unet", "all", "sample"):
        sample(a, log, vae)
    if a.device.startswith("cuda"):
        log(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    log("done")


if __name__ == "__main__":
    main()
