"""Trains Motif's bundled default model on the synthetic world (world.py).

Two stages, each bounded by wall-clock time so that a run fits in a lease of
a GPU machine or a background chunk on a CPU, and each resumable:

  vae   AutoencoderKL on single frames (L1 + L2 + image-gradient L1 + a
        small KL), then its latent scaling factor is measured.
  unet  UNetMotionModel and CLIPTextModel together on whole 16-frame clips
        encoded by the frozen VAE: v-prediction on a zero-terminal-SNR
        schedule (Lin et al. 2023), min-SNR-5 weighting (Hang et al. 2023),
        10 % empty and 5 % preset-negative captions for classifier-free
        guidance, an exponential moving average of the weights.

A GPU window continues the shipped model instead of starting over:
--resume-from assets/models/default loads its f16 weights (VAE frozen),
starts a fresh optimiser and restarts the schedule (linear warm-up over the
first --warmup of the window, cosine to 10 % over the rest; the window is
--unet-seconds and/or --clips-budget, and the loop stops early enough to
save). The held-out loss (the training loss on the 48 held-out clips, fixed
noise and timesteps) is measured at both ends. tools/train/ship.py then
decides whether the window's weights ship; tools/train/gpu_window.sh runs a
whole window.

Throughput: each step's clips are drawn on the host in a prefetch thread
(choices, captions, token ids, render parameters; pinned, sorted by
subject) and rendered and VAE-encoded on the device inside the step, with
no device-to-host read (the loss is read back every --log-every steps);
bf16 autocast on CUDA, --channels-last, --compile, fused AdamW. --clips
scales the learning rate by the square root of --clips / --lr-ref-clips.
--bench N times N steps (clips/s in bench.json); --legacy-loop is the old
loop, kept for that comparison.

Outputs in --out: vae.safetensors, text_encoder.safetensors,
unet.safetensors (f16, the averaged weights), configs.json (with the
window's record under train.window), log.txt, sample.png (four held-out
prompts sampled at the end) and, unless --no-state, state-*.pt
(full-precision weights and optimiser, for --resume). `export.py` turns
them into the diffusers folder that ships.

    python3 tools/train/train.py --out runs/full --device cuda \
        --vae-seconds 110 --unet-seconds 330              # from scratch
    python3 tools/train/train.py --out runs/window --resume-from assets/models/default \
        --clips 96 --lr 3e-4 --unet-seconds 330 --channels-last   # a window
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
            clips = world.render_batch(world.draw_batch(rng, a.vae_clips), 16, a.size, dev)
            pick = torch.randint(0, 16, (a.vae_clips, a.vae_frames), device=dev)
            x = clips[torch.arange(a.vae_clips, device=dev)[:, None], pick].flatten(0, 1) * 2 - 1
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


def lr_scale(a):
    """The learning rate for --clips clips per step: --lr is the rate at
    --lr-ref-clips clips per step, scaled by the square root of the ratio
    (Adam's noise-matching rule: the gradient's noise falls with the square
    root of the batch), linearly, or not at all."""
    ratio = a.clips / a.lr_ref_clips
    return a.lr * {"sqrt": math.sqrt(ratio), "linear": ratio, "none": 1.0}[a.lr_rule]


def window_lr(base, progress, warmup):
    """The schedule of one window: linear warm-up over the first `warmup`
    of the window's progress (0..1, the larger of the time and the clip
    budget spent), then cosine decay to 10 % at its end. Every window
    restarts it, since its optimiser starts fresh."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return base * max(progress / warmup, 0.01)
    rest = (progress - warmup) / (1 - warmup) if warmup < 1 else 1.0
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * rest)))


def should_stop(elapsed, seen, step_time, seconds, clips_budget, margin):
    """Whether the window ends before its next step: the clip budget is
    spent, or the next step (counted twice, for safety) and the final
    checkpoint (`margin` seconds) would not fit in the time budget."""
    if clips_budget is not None and seen >= clips_budget:
        return True
    return elapsed + 2 * (step_time or 0.0) + margin >= seconds


class Prefetch:
    """Draws the host's part of each batch (choices, captions, token ids,
    render parameters, all pinned) in a thread, in order, so that the
    training loop only launches device work."""

    def __init__(self, make, depth=3):
        import queue
        import threading
        self.q = queue.Queue(depth)
        self.make = make
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while not self.stop:
                self.q.put(self.make())
        except BaseException as e:  # handed to the training loop, which raises it
            self.q.put(e)

    def next(self):
        item = self.q.get()
        if isinstance(item, BaseException):
            raise RuntimeError("drawing a training batch failed") from item
        return item

    def close(self):
        self.stop = True
        while self.thread.is_alive():
            try:
                self.q.get_nowait()
            except Exception:
                self.thread.join(0.05)


def recipe_of(a):
    return world.Recipe(action_weights=world.parse_weights(a.action_weights) if a.action_weights else None,
                        camera_weights=world.parse_weights(a.camera_weights) if a.camera_weights else None,
                        canonical_share=a.canonical_share)


def load_folder(folder, dev):
    """The VAE, text encoder and UNet of a diffusers folder (the shipped
    f16 weights), in f32."""
    from diffusers import AutoencoderKL, UNetMotionModel
    from transformers import CLIPTextModel
    need = [os.path.join(folder, part) for part in ("vae", "text_encoder", "unet")]
    missing = [n for n in need if not os.path.isdir(n)]
    if missing:
        raise SystemExit(f"--resume-from {folder}: expected a diffusers folder with vae/, text_encoder/ and unet/, "
                         f"missing {', '.join(os.path.basename(m) + '/' for m in missing)}")
    vae = AutoencoderKL.from_pretrained(need[0], torch_dtype=torch.float32)
    te = CLIPTextModel.from_pretrained(need[1], torch_dtype=torch.float32)
    unet = UNetMotionModel.from_pretrained(need[2], torch_dtype=torch.float32)
    return vae.to(dev), te.to(dev), unet.to(dev)


@torch.no_grad()
def heldout_set(vae, tok, size, frames, dev, per_clip=2):
    """The 48 held-out clips (world.held_out_split) in the canonical
    phrasing, encoded once, each paired with `per_clip` fixed noises and
    timesteps spread evenly over the schedule: the fixed set the held-out
    loss is measured on."""
    items = world.held_out_split()
    gen = torch.Generator().manual_seed(0)
    p = world.choices_to_tensors(items, "cpu", gen)
    lats = []
    for i in range(0, len(items), 8):
        clips = world.render(world.to_device({k: v[i:i + 8] for k, v in p.items()}, dev), frames, size, dev)
        with autocast(dev):
            z = vae.encode(clips.flatten(0, 1) * 2 - 1).latent_dist.mean.float() * vae.config.scaling_factor
        lats.append(z.unflatten(0, (clips.shape[0], frames)).permute(0, 2, 1, 3, 4))
    lat = torch.cat(lats).repeat(per_clip, 1, 1, 1, 1)
    ids = tok([world.caption(c) for c in items] * per_clip, padding="max_length", max_length=77,
              truncation=True, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(1)
    n = lat.shape[0]
    noise = torch.randn(lat.shape, generator=g)
    t = ((torch.arange(n) + 0.5) / n * 1000).long()[torch.randperm(n, generator=g)]
    return dict(lat=lat, ids=ids.to(dev), noise=noise.to(dev), t=t.to(dev))


@torch.no_grad()
def heldout_loss(unet, te, sched, snr, hs, dev, batch=8):
    """Min-SNR-weighted v-prediction loss on the fixed held-out set: the
    training objective on clips whose (colour, subject, action) were never
    trained."""
    total, n = 0.0, hs["lat"].shape[0]
    for i in range(0, n, batch):
        lat, noise, t = hs["lat"][i:i + batch], hs["noise"][i:i + batch], hs["t"][i:i + batch]
        noisy = sched.add_noise(lat, noise, t)
        target = sched.get_velocity(lat, noise, t)
        w = (snr[t].clamp(max=5.0) / (snr[t] + 1)).view(-1, 1, 1, 1, 1)
        with autocast(dev):
            emb = te(hs["ids"][i:i + batch]).last_hidden_state
            pred = unet(noisy, t, encoder_hidden_states=emb.repeat_interleave(lat.shape[2], 0)).sample
        total += float((w * (pred.float() - target) ** 2).mean(dim=(1, 2, 3, 4)).sum())
    return total / n


class Swapped:
    """Puts the averaged weights into the modules for the block's duration."""

    def __init__(self, params, ema):
        self.params, self.ema = params, ema

    def __enter__(self):
        self.saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.ema)

    def __exit__(self, *exc):
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.saved)


def train_unet(a, log, vae, te=None, unet=None):
    from diffusers import DDPMScheduler, UNetMotionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    dev = a.device
    cuda = dev.startswith("cuda")
    torch.manual_seed(a.seed + 2)
    rng = random.Random(a.seed + 2)
    tok = CLIPTokenizer.from_pretrained(TOKENIZER)
    te = te if te is not None else CLIPTextModel(CLIPTextConfig(**TE_CFG)).to(dev)
    unet = unet if unet is not None else UNetMotionModel(**UNET_CFG).to(dev)
    sched = DDPMScheduler(**{k: v for k, v in SCHED_CFG.items() if k not in ("set_alpha_to_one", "steps_offset")})
    vae.requires_grad_(False).eval()
    if a.channels_last and not a.legacy_loop:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    sf = vae.config.scaling_factor
    params = list(unet.parameters()) + list(te.parameters())
    lr = lr_scale(a)
    opt_kw = dict(betas=(0.9, 0.99), weight_decay=0.01)
    if cuda and not a.legacy_loop:
        opt_kw["fused"] = True
    opt = torch.optim.AdamW([{"params": list(unet.parameters()), "lr": lr},
                             {"params": list(te.parameters()), "lr": lr}], **opt_kw)
    ema = [p.detach().clone().float() for p in params]
    step, spent, seen = 0, 0.0, 0
    state = os.path.join(a.state_dir, "state-unet.pt")
    if a.resume and os.path.exists(state):
        s = torch.load(state, map_location=dev)
        unet.load_state_dict(s["unet"]), te.load_state_dict(s["te"]), opt.load_state_dict(s["opt"])
        for e, v in zip(ema, s["ema"]):
            e.copy_(v)
        step, spent, seen = s["step"], s["spent"], s.get("seen", s["step"] * a.clips)
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
        f"text encoder {sum(p.numel() for p in te.parameters()) / 1e6:.2f}M; {a.clips} clips per step at lr {lr:.2e} "
        f"({a.lr_rule} rule from {a.lr:.1e} at {a.lr_ref_clips} clips)")
    acp = sched.alphas_cumprod.to(dev)
    snr = acp / (1 - acp).clamp(min=1e-8)
    sched.alphas_cumprod = acp
    recipe = recipe_of(a)
    frames = a.frames

    hs = None
    window = dict(start=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), resumed_from=a.resume_from,
                  clips_per_step=a.clips, lr=lr, lr_rule=a.lr_rule, warmup=a.warmup, recipe=recipe.describe(),
                  freeze_te_after=a.freeze_te_after, size=a.size, frames=frames, seed=a.seed)
    if a.heldout and not a.bench:
        hs = heldout_set(vae, tok, a.size, frames, dev)
    if hs is not None and a.heldout_start:
        with Swapped(params, ema):
            window["heldout_loss_start"] = heldout_loss(unet.eval(), te.eval(), sched, snr, hs, dev)
        unet.train(), te.train()
        log(f"unet: held-out loss at the start {window['heldout_loss_start']:.5f}")

    def draw():
        b = world.draw_batch(rng, a.clips, recipe)
        caps = [uncond(rng) or c for c in b["captions"]]
        ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        if cuda:
            b["params"] = {k: v.pin_memory() for k, v in b["params"].items()}
            ids = ids.pin_memory()
        b["ids"] = ids
        return b

    fwd = unet
    if a.compile != "none" and not a.legacy_loop:
        fwd = torch.compile(unet, mode=None if a.compile == "default" else a.compile)
    feed = None if a.legacy_loop else Prefetch(draw)
    te_frozen = False

    def one_step(progress):
        nonlocal te_frozen
        if not te_frozen and a.freeze_te_after is not None and seen >= a.freeze_te_after:
            te.requires_grad_(False)
            te_frozen = True
            log(f"unet: text encoder frozen after {seen} clips")
        for g in opt.param_groups:
            g["lr"] = window_lr(lr, progress, a.warmup)
        with torch.no_grad():
            if a.legacy_loop:
                clips, caps, _ = world.make_batch(rng, a.clips, frames=frames, size=a.size, device=dev)
                caps = [uncond(rng) or c for c in caps]
                ids = tok(caps, padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt").input_ids.to(dev)
            else:
                b = feed.next()
                clips = world.render_batch(b, frames, a.size, dev)
                ids = b["ids"].to(dev, non_blocking=True)
            x = clips.flatten(0, 1) * 2 - 1
            if a.channels_last and not a.legacy_loop:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(dev):
                lat = vae.encode(x).latent_dist.mean.float() * sf
            lat = lat.unflatten(0, (a.clips, frames)).permute(0, 2, 1, 3, 4)  # [B, C, F, h, w]
            noise = torch.randn_like(lat)
            t = torch.randint(0, 1000, (a.clips,), device=dev)
            noisy = sched.add_noise(lat, noise, t)
            target = sched.get_velocity(lat, noise, t)
            w = (snr[t].clamp(max=5.0) / (snr[t] + 1)).view(-1, 1, 1, 1, 1)
        with autocast(dev):
            if te_frozen:
                with torch.no_grad():
                    emb = te(ids).last_hidden_state
            else:
                emb = te(ids).last_hidden_state
            pred = fwd(noisy, t, encoder_hidden_states=emb.repeat_interleave(frames, 0)).sample
        loss = (w * (pred.float() - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.detach()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if a.bench:
        for _ in range(a.bench_warmup):
            one_step(0.5)
        sync()
        t0 = time.time()
        for i in range(a.bench):
            loss = one_step(0.5)
            if a.legacy_loop:
                loss.item()
        sync()
        wall = time.time() - t0
        if feed:
            feed.close()
        result = dict(mode="legacy" if a.legacy_loop else "new", clips_per_step=a.clips, steps=a.bench,
                      seconds=round(wall, 3), clips_per_s=round(a.bench * a.clips / wall, 2),
                      steps_per_s=round(a.bench / wall, 3), channels_last=a.channels_last, compile=a.compile,
                      size=a.size, frames=frames, device=torch.cuda.get_device_name() if cuda else "cpu",
                      peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)
        json.dump(result, open(os.path.join(a.out, "bench.json"), "w"), indent=1)
        log(f"bench: {json.dumps(result)}")
        return unet, te, tok

    seconds = a.unet_seconds
    budget = a.clips_budget
    t0 = time.time() - spent
    last_save = time.time()
    loss_sum, loss_n, step_time = None, 0, None
    while True:
        elapsed = time.time() - t0
        if should_stop(elapsed, seen, step_time, seconds, budget, a.deadline_margin):
            break
        progress = max(elapsed / seconds, (seen + a.clips) / budget if budget else 0.0)
        ts = time.time()
        loss = one_step(progress)
        step += 1
        seen += a.clips
        decay = min(a.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if a.legacy_loop:
            loss_sum = loss.item() if loss_sum is None else loss_sum + loss.item()
        else:
            loss_sum = loss if loss_sum is None else loss_sum + loss
        loss_n += 1
        dt = time.time() - ts
        step_time = dt if step_time is None else 0.9 * step_time + 0.1 * dt
        if step % a.log_every == 0:
            log(f"unet step {step}: loss {float(loss_sum) / loss_n:.4f} (mean of {loss_n}), {seen} clips, "
                f"{seen / (time.time() - t0):.1f} clips/s, lr {opt.param_groups[0]['lr']:.2e}")
            loss_sum, loss_n = None, 0
        if time.time() - last_save > a.save_every:
            save_unet(a, unet, te, opt, ema, params, step, time.time() - t0, rng, log, seen, window)
            last_save = time.time()
    if feed:
        feed.close()
    sync()
    spent = time.time() - t0
    window.update(seconds=round(spent, 1), minutes=round(spent / 60, 2), steps=step, clips_seen=seen,
                  clips_per_s=round(seen / max(spent, 1e-9), 2),
                  device=torch.cuda.get_device_name() if cuda else "cpu")
    if hs is not None:
        with Swapped(params, ema):
            window["heldout_loss_end"] = heldout_loss(unet.eval(), te.eval(), sched, snr, hs, dev)
        unet.train(), te.train()
        log(f"unet: held-out loss at the end {window['heldout_loss_end']:.5f} "
            f"(start {window.get('heldout_loss_start', float('nan')):.5f})")
    save_unet(a, unet, te, opt, ema, params, step, spent, rng, log, seen, window)
    return unet, te, tok


def ema_state(module, params, ema, offset):
    """The module's state dict with the averaged values in place of its parameters."""
    sd = dict(module.state_dict())
    names = [n for n, _ in module.named_parameters()]
    for i, n in enumerate(names):
        sd[n] = ema[offset + i]
    return sd, offset + len(names)


def save_unet(a, unet, te, opt, ema, params, step, spent, rng, log, seen=None, window=None):
    usd, off = ema_state(unet, params, ema, 0)
    tsd, _ = ema_state(te, params, ema, off)
    save_f16(usd, os.path.join(a.out, "unet.safetensors"))
    save_f16(tsd, os.path.join(a.out, "text_encoder.safetensors"))
    cfg_path = os.path.join(a.out, "configs.json")
    train = json.load(open(cfg_path)).get("train", {}) if os.path.exists(cfg_path) else {}
    train.update(unet_steps=step, unet_seconds=round(spent), clips_per_step=a.clips, frames=a.frames,
                 size=a.size, device=torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu")
    if seen is not None:
        train["clips_seen"] = seen
    if window is not None:
        # This run's window, for ship.py to log in the model card.
        train["window"] = window
    write_configs(a, train=train)
    if not a.no_state:
        torch.save(dict(unet=unet.state_dict(), te=te.state_dict(), opt=opt.state_dict(), ema=ema,
                        step=step, spent=spent, seen=seen, rng=rng.getstate()),
                   os.path.join(a.state_dir, "state-unet.pt"))
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


def write_start(a, vae, log):
    """A run folder that starts from a diffusers folder: its VAE (frozen,
    copied as it is) and the configs, so that export.py and --stage sample
    work on the run as on one trained from scratch."""
    save_f16(vae, os.path.join(a.out, "vae.safetensors"))
    strip = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    write_configs(a, vae=strip(vae.config))
    log(f"resumed from the shipped weights in {a.resume_from} with a fresh optimiser; schedule restarts: "
        f"warm-up over the first {a.warmup:.0%} of the window, cosine to 10 % over the rest")


def positive(kind):
    def parse(text):
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, found {text}")
        return v
    return parse


def fraction(text):
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number within [0, 1], found {text}")
    return v


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for weights, configs and the log")
    ap.add_argument("--stage", choices=["vae", "unet", "all", "sample"], default="all")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=positive(int), help="CPU threads for torch (default: torch's)")
    ap.add_argument("--size", type=positive(int), default=128, help="frame size in pixels")
    ap.add_argument("--frames", type=positive(int), default=16)
    ap.add_argument("--vae-seconds", type=float, default=110)
    ap.add_argument("--vae-clips", type=int, default=32, help="clips drawn per VAE step")
    ap.add_argument("--vae-frames", type=int, default=4, help="frames taken from each")
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--kl", type=float, default=1e-4, help="KL weight (per latent element, per pixel)")
    ap.add_argument("--unet-seconds", type=positive(float), default=330,
                    help="time budget of the UNet stage; it stops and saves before the budget runs out")
    ap.add_argument("--clips-budget", type=positive(int), help="stop the UNet stage after this many clips seen")
    ap.add_argument("--deadline-margin", type=float, default=5.0,
                    help="seconds kept free at the end of --unet-seconds for the last checkpoint")
    ap.add_argument("--clips", type=positive(int), default=24, help="clips per UNet step")
    ap.add_argument("--lr", type=positive(float), default=5e-4, help="learning rate at --lr-ref-clips clips per step")
    ap.add_argument("--lr-ref-clips", type=positive(int), default=24)
    ap.add_argument("--lr-rule", choices=["sqrt", "linear", "none"], default="sqrt",
                    help="how the learning rate follows --clips (default: square root of the ratio)")
    ap.add_argument("--warmup", type=fraction, default=0.05,
                    help="share of the window spent warming the learning rate up")
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=float, default=60, help="seconds between checkpoints")
    ap.add_argument("--log-every", type=positive(int), default=50, help="steps between log lines (the only host syncs)")
    ap.add_argument("--state-dir", help="where resumable state goes (default: --out)")
    ap.add_argument("--resume", action="store_true", help="continue from the state in --state-dir")
    ap.add_argument("--init", help="start the UNet stage from the (f16, averaged) weights in this run folder")
    ap.add_argument("--resume-from", metavar="DIR",
                    help="continue from a diffusers folder (the shipped weights, assets/models/default): "
                         "its VAE frozen, UNet and text encoder trained on, fresh optimiser")
    ap.add_argument("--no-state", action="store_true", help="write no resumable state")
    ap.add_argument("--no-sample", action="store_true", help="skip sample.png at the end")
    ap.add_argument("--no-heldout", dest="heldout", action="store_false",
                    help="skip the held-out loss at the start and end of the UNet stage")
    ap.add_argument("--no-heldout-start", dest="heldout_start", action="store_false",
                    help="measure the held-out loss at the end only")
    # Recipe.
    ap.add_argument("--freeze-te-after", type=int, metavar="CLIPS",
                    help="freeze the text encoder after this many clips of the window (default: train it throughout)")
    ap.add_argument("--canonical-share", type=fraction, default=0.0,
                    help="share of captions in the canonical phrasing (default 0: all varied)")
    ap.add_argument("--action-weights", help="relative weights of actions, e.g. left=2,right=2 (others 1)")
    ap.add_argument("--camera-weights", help="relative weights of camera moves, e.g. static=0.5 (others 1)")
    # Throughput.
    ap.add_argument("--channels-last", action="store_true", help="UNet and VAE in channels-last memory format")
    ap.add_argument("--compile", choices=["none", "default", "reduce-overhead", "max-autotune"], default="none",
                    help="torch.compile the UNet (reduce-overhead adds CUDA graphs)")
    ap.add_argument("--legacy-loop", action="store_true",
                    help="the old per-step loop (host-side batch drawing with syncs, a loss read back every step), "
                         "for measuring the speed-up")
    ap.add_argument("--bench", type=int, metavar="STEPS", help="time this many UNet steps, write bench.json, stop")
    ap.add_argument("--bench-warmup", type=int, default=3, help="untimed steps before --bench's")
    return ap


def main(argv=None):
    a = parser().parse_args(argv)
    a.state_dir = a.state_dir or a.out
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.resume_from and a.stage not in ("unet",):
        if a.stage != "all":
            raise SystemExit(f"--resume-from trains the UNet stage only; --stage {a.stage} does not go with it")
        a.stage = "unet"
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
    te = unet = None
    if a.resume_from:
        vae, te, unet = load_folder(a.resume_from, a.device)
        if not a.bench:
            write_start(a, vae, log)
    elif a.stage in ("vae", "all"):
        vae = train_vae(a, log)
    else:
        vae = load_vae(a)
    if a.stage in ("unet", "all"):
        train_unet(a, log, vae, te, unet)
    if a.stage in ("unet", "all", "sample") and not a.bench and not a.no_sample:
        sample(a, log, vae)
    if a.device.startswith("cuda"):
        log(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    log("done")


if __name__ == "__main__":
    main()
