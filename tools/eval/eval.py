"""Evaluates Motif's bundled model on the held-out split of the synthetic
world (tools/train/world.py): 48 prompts whose (colour, subject, action)
combinations were never shown in training, each with a fixed seed.

Three rates, measured from the frames alone:

  colour     all 48 clips. Every pixel is classified by hue to the
             nearest of world.COLOURS (white by low saturation and high
             value), within thresholds, so that a neon glow or a watercolour
             wash still reads as its colour. The predicted colour is the one
             whose share of the clip's pixels exceeds its share in
             background-only renders of the same item (same scene, time,
             style and camera; subject moved off screen; other textures and
             camera starts) by the most, in units of those renders' spread.
             Correct if it is the prompted colour.
  direction  the 16 static-camera clips whose action has a direction
             (world.ACTION_DIRECTION). The prompted colour's pixels,
             less those that hold it in most frames (the static
             background), give a centroid per frame; a line fitted to the
             centroids over time gives the displacement. Correct if its
             dominant axis and sign are the prompted ones and it is at
             least MIN_TRAVEL_PX long.
  camera     the 24 moving-camera clips. Each move of world.CAMERAS
             (static included) at 0.5, 1 and 1.5 times its trained
             amplitude warps frame 0 exactly as world.render maps screen to
             world, predicting every later frame; the move whose
             predictions match the (blurred) frames best, by the median
             error over the pixels they predict, is the predicted one.
             Correct if it is the prompted move.

Modes:

    # the metrics on ground-truth renders: they must score near 100 %
    python3 tools/eval/eval.py --truth
    # the model, at motif.json's defaults (diffusers on the CPU)
    python3 tools/eval/eval.py [--limit N] [--save-gifs DIR]
    # the same on a GPU: all 48 clips in one batch, measured there
    python3 tools/eval/eval.py --device cuda --batch 48
    # a sweep: every (steps, guidance) pair, rates per pair
    python3 tools/eval/eval.py --limit 16 --guidance 2.5,4,5,7
    # N held-out prompts through the Rust engine: writes a motif-cases-v1
    # `pipeline` case set on the shipped weights, runs `motif conformance`
    python3 tools/eval/eval.py --engine 8

Each clip's initial noise comes from its own CPU generator seeded with its
seed, so a clip is the same in any batch and on any device (up to the
device's arithmetic).

Results go to --out (JSON, per clip and per setting); a table is printed.
"""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "train"))
sys.path.insert(0, str(ROOT / "tools" / "fixtures"))
import world  # noqa: E402

MODEL = ROOT / "assets" / "models" / "default"

# Colour classification by hue, so that a neon glow over a dark scene, a
# watercolour wash or a model's washed-out render still reads as its colour:
# a pixel at least MIN_SATURATION saturated and MIN_VALUE bright takes the
# chromatic colour of nearest hue, if within MAX_HUE_DEG; a pixel under
# WHITE_SATURATION and at least WHITE_VALUE bright is white; others are none.
MIN_SATURATION = 0.3
MIN_VALUE = 0.25
MAX_HUE_DEG = 20.0
WHITE_SATURATION = 0.15
WHITE_VALUE = 0.7
# Background-only renders per item (at 4 of the 16 frames' times) for the
# colour reference, and the floor of their spread (a share of the frame).
BACKGROUND_RENDERS = 8
BACKGROUND_FRAMES = 4
SPREAD_FLOOR = 0.01
# Direction: a pixel holding the colour in at least this share of the frames
# is background; a frame needs MIN_PIXELS of the rest for a centroid, a clip
# MIN_FRAMES such frames; the fitted travel must reach MIN_TRAVEL_PX (the
# truth travels 64 to 77 px at 128 px).
STATIC_SHARE = 0.75
MIN_PIXELS = 16
MIN_FRAMES = 6
MIN_TRAVEL_PX = 8.0
# Camera: hypotheses at these fractions of the trained amplitude; frames
# blurred by a Gaussian of this sigma (pixels at 128 px) before comparing;
# a frame's error is the median over the pixels a hypothesis predicts, so
# that the subject's own motion (up to a tenth of the frame, sometimes far
# more) does not decide it.
CAMERA_SCALES = (0.5, 1.0, 1.5)
BLUR_SIGMA = 1.5


# --- ground truth ------------------------------------------------------------

def item_params(item, variant=0, subject=True):
    """world.render's parameters for one held-out item: continuous choices
    drawn from the item's seed (variant > 0 draws other ones). Without the
    subject, it is moved far off screen (nothing of it is drawn, not even a
    neon glow)."""
    gen = torch.Generator().manual_seed(item["seed"] * 101 + variant)
    p = world.choices_to_tensors([item], "cpu", gen)
    if not subject:
        p["jx"] = torch.full_like(p["jx"], 1e4)
    return p


def render_truth(item, frames=16, size=128):
    return world.render(item_params(item), frames, size)[0]


# --- colour ------------------------------------------------------------------

def hsv(x):
    """[..., 3] RGB in [0, 1] -> hue (degrees), saturation, value."""
    value = x.max(-1).values
    chroma = value - x.min(-1).values
    r, g, b = x.unbind(-1)
    c = chroma.clamp_min(1e-6)
    hue = torch.where(value == r, ((g - b) / c) % 6, torch.where(value == g, (b - r) / c + 2, (r - g) / c + 4)) * 60
    return hue, chroma / value.clamp_min(1e-6), value


_HUE = hsv(torch.tensor(list(world.COLOURS.values())))[0]
_WHITE = world.COLOUR_NAMES.index("white")
_CHROMATIC = torch.tensor([i for i in range(len(world.COLOUR_NAMES)) if i != _WHITE])


def classify(clip):
    """[F, 3, H, W] in [0, 1] -> [F, H, W] colour indices, -1 for none."""
    hue, sat, value = hsv(clip.permute(0, 2, 3, 1))
    chromatic = _CHROMATIC.to(clip.device)
    gap = (hue[..., None] - _HUE.to(clip.device)[chromatic]).abs()
    gap, nearest = torch.minimum(gap, 360 - gap).min(-1)
    labels = torch.where((sat >= MIN_SATURATION) & (value >= MIN_VALUE) & (gap <= MAX_HUE_DEG),
                         chromatic[nearest], torch.full_like(nearest, -1))
    return torch.where((sat < WHITE_SATURATION) & (value >= WHITE_VALUE), torch.full_like(labels, _WHITE), labels)


def colour_shares(clip):
    """Share of the clip's pixels of each colour (on the CPU)."""
    labels = classify(clip)
    return torch.stack([(labels == c).float().mean() for c in range(len(world.COLOUR_NAMES))]).cpu()


_BACKGROUNDS = {}


def background_shares(item, size, device="cpu"):
    """Mean and spread of the colour shares of background-only renders of
    the item, all drawn in one batch on `device` (cached: a sweep measures
    the same items again)."""
    key = (item["seed"], size)
    if key not in _BACKGROUNDS:
        rows = [item_params(item, v + 1, subject=False) for v in range(BACKGROUND_RENDERS)]
        p = world.to_device({k: torch.cat([r[k] for r in rows]) for k in rows[0]}, device)
        clips = world.render(p, BACKGROUND_FRAMES, size, device)
        shares = torch.stack([colour_shares(c) for c in clips])
        _BACKGROUNDS[key] = (shares.mean(0), shares.std(0))
    return _BACKGROUNDS[key]


def colour_metric(clip, item, background):
    """The colour whose share of the clip exceeds its share in the item's
    background-only renders by the most, in units of those renders' spread
    (a sky's white clouds vary far more between renders than its red)."""
    mean, spread = background
    shares = colour_shares(clip)
    score = (shares - mean) / (spread + SPREAD_FLOOR)
    order = score.argsort(descending=True).tolist()
    predicted = world.COLOUR_NAMES[order[0]]
    return {
        "expected": item["colour"], "predicted": predicted, "correct": predicted == item["colour"],
        "score_top3": {world.COLOUR_NAMES[i]: round(float(score[i]), 3) for i in order[:3]},
        "share": round(float(shares[world.COLOUR_NAMES.index(item["colour"])]), 5),
        "background_share": round(float(mean[world.COLOUR_NAMES.index(item["colour"])]), 5),
    }


# --- direction ---------------------------------------------------------------

def direction_metric(clip, item):
    """Centroid track of the prompted colour's moving pixels."""
    frames, _, size, _ = clip.shape
    mask = classify(clip) == world.COLOUR_NAMES.index(item["colour"])
    moving = (mask & ~(mask.float().mean(0) >= STATIC_SHARE)).cpu()
    rows = torch.arange(size, dtype=torch.float32)[:, None]
    cols = torch.arange(size, dtype=torch.float32)[None, :]
    t, xs, ys = [], [], []
    for f in range(frames):
        m = moving[f].float()
        n = float(m.sum())
        if n >= MIN_PIXELS * (size / 128) ** 2:
            t.append(f)
            xs.append(float((m * cols).sum()) / n)
            ys.append(float((m * rows).sum()) / n)
    out = {"expected": item["action"], "frames_tracked": len(t)}
    if len(t) < MIN_FRAMES:
        return {**out, "travel_px": None, "correct": False}
    # Displacement over the whole clip from a least-squares line; y up, as
    # world.ACTION_DIRECTION is written. Pixels scaled to a 128 px frame.
    scale = 128 / size
    dx = float(np.polyfit(t, xs, 1)[0]) * (frames - 1) * scale
    dy = -float(np.polyfit(t, ys, 1)[0]) * (frames - 1) * scale
    want = world.ACTION_DIRECTION[item["action"]]
    got = (1 if dx > 0 else -1, 0) if abs(dx) >= abs(dy) else (0, 1 if dy > 0 else -1)
    return {**out, "travel_px": [round(dx, 2), round(dy, 2)],
            "correct": got == want and math.hypot(dx, dy) >= MIN_TRAVEL_PX}


# --- camera ------------------------------------------------------------------

def camera_transform(camera, t, scale):
    """Where a pixel of the frame at time t (0..1) was in frame 0, in
    world.render's screen coordinates (u right, v up, both -1..1): the
    inverse of world.render's camera, relative to the first frame.
    Returns (offset x, offset y, zoom, roll)."""
    s = scale * t
    dx = world.PAN * s * ((camera == "pan-left") - (camera == "pan-right"))
    dy = world.PAN * s * ((camera == "tilt-down") - (camera == "tilt-up"))
    zoom = math.exp(world.ZOOM * s * ((camera == "zoom-in") - (camera == "zoom-out")))
    roll = world.ROLL * s * ((camera == "roll-cw") - (camera == "roll-ccw"))
    return dx, dy, zoom, roll


def _blur(x, sigma):
    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32, device=x.device) ** 2 / (2 * sigma * sigma))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def camera_errors(clip):
    """Error of each (camera, scale) hypothesis's prediction of frames 1..
    from frame 0: per frame the median absolute difference over the pixels
    it predicts, then the mean over frames."""
    frames, _, size, _ = clip.shape
    sigma = BLUR_SIGMA * size / 128
    x = _blur(clip.float(), sigma)
    centres = (torch.arange(size, dtype=torch.float32, device=clip.device) + 0.5) / size * 2 - 1
    v, u = -centres[:, None].expand(size, size), centres[None, :].expand(size, size)
    # Pixels whose source lies within the blur's reach of frame 0's edge
    # are not predicted.
    margin = 1 - 2 * 3 * sigma / size
    errors = {}
    for camera in world.CAMERAS:
        for scale in ((0.0,) if camera == "static" else CAMERA_SCALES):
            grids = []
            for f in range(1, frames):
                dx, dy, zoom, roll = camera_transform(camera, f / (frames - 1), scale)
                cr, sr = math.cos(roll), math.sin(roll)
                u0 = (cr * u - sr * v) / zoom + dx
                v0 = (sr * u + cr * v) / zoom + dy
                grids.append(torch.stack([u0, -v0], -1))  # grid_sample: x right, y down
            grid = torch.stack(grids)
            pred = F.grid_sample(x[:1].expand(frames - 1, -1, -1, -1), grid, mode="bilinear",
                                 padding_mode="zeros", align_corners=False)
            valid = (grid[..., 0].abs() <= margin) & (grid[..., 1].abs() <= margin)
            diff = (pred - x[1:]).abs().mean(1).cpu()
            valid = valid.cpu()
            per_frame = [float(diff[f][valid[f]].median()) if int(valid[f].sum()) >= 64 else float("inf")
                         for f in range(frames - 1)]
            errors[(camera, scale)] = sum(per_frame) / len(per_frame)
    return errors


def camera_metric(clip, item):
    errors = camera_errors(clip)
    best = {}
    for (camera, scale), e in errors.items():
        if camera not in best or e < best[camera][0]:
            best[camera] = (e, scale)
    ranked = sorted(best.items(), key=lambda kv: kv[1][0])
    predicted, (_, scale) = ranked[0]
    return {
        "expected": item["camera"], "predicted": predicted, "correct": predicted == item["camera"],
        "scale": scale, "errors_top3": {c: round(e, 5) for c, (e, _) in ranked[:3]},
    }


# --- one setting over the split ----------------------------------------------

def measure(clip, item, background):
    r = {"colour": colour_metric(clip, item, background)}
    if item["camera"] == "static" and item["action"] in world.ACTION_DIRECTION:
        r["direction"] = direction_metric(clip, item)
    if item["camera"] != "static":
        r["camera"] = camera_metric(clip, item)
    return r


def rates(clips):
    out = {}
    for metric in ("colour", "direction", "camera"):
        hits = [c[metric]["correct"] for c in clips if metric in c]
        out[metric] = {"correct": sum(hits), "total": len(hits), "rate": sum(hits) / len(hits) if hits else None}
    return out


def save_gif(path, clip, truth, fps):
    from PIL import Image
    both = torch.cat([clip, truth], -1)  # generated | ground truth
    frames = (both.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def render_truths(items, frames, size, device="cpu"):
    """Ground-truth renders of `items` in one batch on `device`."""
    rows = [item_params(it) for it in items]
    p = world.to_device({k: torch.cat([r[k] for r in rows]) for k in rows[0]}, device)
    return world.render(p, frames, size, device)


def run_generate(model, items, defaults, steps, guidance, device="cpu", batch=1, gifs=None, label="", pipe=None):
    """One (steps, guidance) setting over `items`: the clips generated in
    batches of `batch` on `device` and measured there."""
    pipe = pipe or load_pipeline(model).to(device)
    print(f"steps {steps}, guidance {guidance}: {len(items)} clips, batches of {batch} on {device}", flush=True)
    t0 = time.time()
    clips = evaluate(items, lambda chunk: generate(pipe, chunk, defaults, steps, guidance), defaults, gifs, label,
                     batch, device)
    wall = time.time() - t0
    return {"steps": steps, "guidance": guidance, "rates": rates(clips), "seconds_per_clip": wall / len(items),
            "wall_s": round(wall, 1), "device": device, "batch": batch, "clips": clips}


def model_defaults(model, size=None, frames=None):
    """motif.json's defaults, with the frame size and count overridden (a
    quick check at a smaller size)."""
    path = Path(model) / "motif.json"
    try:
        defaults = json.loads(path.read_text())["defaults"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{path}: expected motif.json with a 'defaults' object ({e})")
    if size:
        defaults = dict(defaults, width=size, height=size)
    if frames:
        defaults = dict(defaults, frames=frames)
    return defaults


def load_pipeline(model):
    import diffusers
    import transformers
    from diffusers import AnimateDiffPipeline
    # pipeline_cases.run casts the pipeline to f64 and back, which diffusers
    # warns about on every call; the casts are intended.
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    pipe = AnimateDiffPipeline.from_pretrained(str(model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, items, defaults, steps, guidance):
    """The clips of `items` in one batch, [n, F, 3, H, W]. Each item's
    initial noise comes from its own CPU generator seeded with its seed, so
    a clip does not depend on the batch it is in or on the device."""
    out = pipe(prompt=[world.caption(it) for it in items], negative_prompt=[defaults.get("negative", "")] * len(items),
               num_frames=defaults["frames"], height=defaults["height"], width=defaults["width"],
               num_inference_steps=steps, guidance_scale=guidance,
               generator=[torch.Generator().manual_seed(it["seed"]) for it in items], output_type="pt")
    return out.frames.float()


def evaluate(items, source, defaults, gifs=None, label="", batch=1, device="cpu"):
    """`source(items)` gives their clips [n, F, 3, H, W], `batch` items at a
    time; the metrics run on `device`. Returns per-clip results."""
    frames, size = defaults["frames"], defaults["width"]
    results = []
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        t0 = time.time()
        clips = source(chunk).to(device)
        wall = (time.time() - t0) / len(chunk)
        for j, (item, clip) in enumerate(zip(chunk, clips)):
            results.append(_evaluate_one(start + j, len(items), item, clip, wall, defaults, gifs, label, device))
    return results


def _evaluate_one(i, n, item, clip, wall, defaults, gifs, label, device):
    frames, size = defaults["frames"], defaults["width"]
    r = measure(clip, item, background_shares(item, size, device))
    r = {"index": item["index"], "prompt": world.caption(item), "seed": item["seed"], **r,
         "clip_s": round(wall, 2)}
    if gifs:
        name = f"{label}{item['index']:02d}-{item['colour']}-{item['subject']}-{item['action']}-{item['camera']}.gif"
        save_gif(os.path.join(gifs, name), clip.cpu(), render_truth(item, frames, size), defaults.get("fps", 8))
    marks = " ".join(f"{m}={'ok' if r[m]['correct'] else 'x '}" for m in ("colour", "direction", "camera") if m in r)
    print(f"  [{i + 1:2d}/{n}] #{item['index']:02d} {marks:32s} {wall:5.1f}s  {r['prompt']}", flush=True)
    return r


def print_table(settings):
    print()
    print(f"{'steps':>5} {'guidance':>8} | {'colour':>12} {'direction':>12} {'camera':>12} | {'s/clip':>6}")
    for s in settings:
        cells = []
        for m in ("colour", "direction", "camera"):
            r = s["rates"][m]
            cells.append(f"{r['correct']:2d}/{r['total']:2d} {100 * r['rate']:4.0f}%" if r["total"] else "-")
        steps = "-" if s["steps"] is None else s["steps"]
        guidance = "-" if s["guidance"] is None else s["guidance"]
        print(f"{steps:>5} {guidance:>8} | {cells[0]:>12} {cells[1]:>12} {cells[2]:>12} | {s['seconds_per_clip']:6.1f}")


# --- engine conformance ------------------------------------------------------

def write_engine_cases(out, model, items, defaults):
    """A motif-cases-v1 set of `pipeline` cases on the shipped weights: the
    model folder is not copied, `pipeline_dir` points at it."""
    from make_cases import CaseSet, max_gap, tolerance
    from pipeline_cases import run

    shutil.rmtree(out, ignore_errors=True)
    (out / "scheduler").mkdir(parents=True)
    shutil.copy(model / "scheduler" / "scheduler_config.json", out / "scheduler" / "scheduler_config.json")
    pipe = load_pipeline(model)
    cs = CaseSet(out)
    f = pipe.vae_scale_factor
    latent_hw = [defaults["height"] // f, defaults["width"] // f]
    channels = pipe.unet.config.in_channels
    for item in items:
        t0 = time.time()
        # The latents diffusers draws for the item's seed (DDIM's
        # init_noise_sigma is 1): the engine's clip is the evaluated clip.
        shape = (1, channels, defaults["frames"], *latent_hw)
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(item["seed"])).numpy()
        args = dict(prompt=world.caption(item), negative_prompt=defaults.get("negative", ""), frames=defaults["frames"],
                    height=defaults["height"], width=defaults["width"], steps=defaults["steps"],
                    guidance=defaults["guidance"])
        ref = run(pipe, 1, torch.float32, args, latents, None)
        f64 = run(pipe, 1, torch.float64, args, latents, None)
        two = run(pipe, 2, torch.float32, args, latents, None)
        pipe.to(dtype=torch.float32)
        case = f"heldout{item['index']:02d}_pipeline"
        outputs = []
        for key, val in ref.items():
            if key in ("timesteps", "prompt_ids"):
                exp = val.astype(np.int64)
                outputs.append({**cs.add_tensor(f"{case}.{key}", exp), "name": key, "tolerance_max_abs": 0, "exact": True})
                continue
            exp = val.astype(np.float32)
            tol = tolerance(exp, max_gap(val, f64[key]), max_gap(val, two[key]))
            outputs.append({**cs.add_tensor(f"{case}.{key}", exp), "name": key, "tolerance_max_abs": tol, "exact": False})
        cs.cases.append({
            "name": case, "component": "pipeline",
            "call": "AnimateDiffPipeline(prompt, negative_prompt, num_frames, height, width, num_inference_steps, "
                    "guidance_scale, latents=latents, output_type='np') on assets/models/default",
            "inputs": {**args, "scheduler_config": "scheduler/scheduler_config.json",
                       "latents": cs.add_tensor(f"{case}.latents_in", latents)},
            "outputs": outputs,
        })
        print(f"  case {case}: {time.time() - t0:.0f}s  {args['prompt']}", flush=True)
    torch.set_num_threads(2)
    cs.write({"pipeline_dir": os.path.relpath(model, out), "frames": defaults["frames"], "latent_hw": latent_hw,
              "image_hw": [defaults["height"], defaults["width"]],
              "vae_scaling_factor": pipe.vae.config.scaling_factor,
              "note": "held-out prompts of tools/train/world.py at the model's defaults (tools/eval/eval.py --engine)"})


LINE = re.compile(r"^(\S+)  (\S+)  (\S+)  (\S+) \((.*)\)  (ok|FAIL)$")


def run_engine(cases_dir, precision):
    binary = ROOT / "target" / "release" / "motif"
    env = dict(os.environ)
    env.setdefault("XDG_RUNTIME_DIR", "/tmp")
    if not binary.exists():
        subprocess.run(["cargo", "build", "--release"], cwd=ROOT, check=True, env=env)
    cmd = [str(binary), "conformance", str(cases_dir), "--component", "pipeline"]
    if precision:
        cmd += ["--precision", precision]
    print("  $", " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        line = line.rstrip("\n")
        lines.append(line)
        print("   ", line, flush=True)
    proc.wait()
    outputs = []
    for line in lines:
        m = LINE.match(line)
        if m:
            case, output, err, tol, budget, ok = m.groups()
            outputs.append({"case": case, "output": output, "max_abs_err": float(err), "tolerance": float(tol),
                            "budget": budget, "ok": ok == "ok"})
        elif "  (case)  " in line:
            outputs.append({"case": line.split()[0], "output": "(case)", "error": line, "ok": False})
    summary = next((ln for ln in reversed(lines) if re.match(r"^\d+ passed, \d+ failed$", ln)), None)
    adapter = next((ln for ln in lines if ln.startswith("adapter:")), None)
    return {"command": " ".join(cmd), "exit_code": proc.returncode, "seconds": round(time.time() - t0, 1),
            "adapter": adapter, "summary": summary, "outputs": outputs}


# --- main --------------------------------------------------------------------

def held_out(n=None):
    """The split's items (with their index), or n of them: the first half
    of n from the still-camera half of the split and the rest from the
    moving-camera half. The split cycles through its 12 (colour, subject,
    action) triples and its 8 camera moves, so n = 16 holds the 8 directed
    triples twice, 8 direction clips and all 8 moves."""
    split = [dict(item, index=i) for i, item in enumerate(world.held_out_split())]
    if n is None or n >= len(split):
        return split
    half = len(split) // 2
    still = (n + 1) // 2
    return split[:still] + split[half:half + n - still]


def number_list(kind):
    return lambda text: [kind(v) for v in text.split(",") if v.strip()]


def versions():
    import diffusers
    import transformers
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(MODEL), help="diffusers folder with motif.json (default: the bundled model)")
    ap.add_argument("--truth", action="store_true", help="measure ground-truth renders instead of generated clips")
    ap.add_argument("--engine", type=int, metavar="N", help="write N held-out pipeline cases (N >= 8 for the record) "
                    "and run them through `motif conformance`")
    ap.add_argument("--cases-dir", default=str(ROOT / "runs" / "eval-engine-cases"), help="where --engine writes its case set")
    ap.add_argument("--precision", choices=["f32", "f16"], help="--engine: the engine's precision (default: its own)")
    ap.add_argument("--reuse-cases", action="store_true", help="--engine: run the case set already in --cases-dir")
    ap.add_argument("--steps", type=number_list(int), help="comma-separated (default: motif.json's)")
    ap.add_argument("--guidance", type=number_list(float), help="comma-separated (default: motif.json's)")
    ap.add_argument("--limit", type=int, metavar="N", help="only N clips, half with a still camera, half moving")
    ap.add_argument("--save-gifs", metavar="DIR", help="write each clip beside its ground-truth render")
    ap.add_argument("--out", default=str(ROOT / "runs" / "eval.json"), help="results (JSON)")
    ap.add_argument("--device", default="cpu", help="where the clips are generated and measured (cuda for a GPU)")
    ap.add_argument("--batch", type=int, default=1, help="clips generated at once (48 on a GPU: the whole split)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    ap.add_argument("--size", type=int, help="frame size instead of motif.json's (a quick check, not the record)")
    ap.add_argument("--frames", type=int, help="frames instead of motif.json's (a quick check, not the record)")
    a = ap.parse_args()
    if a.batch < 1:
        ap.error(f"--batch: expected at least 1, found {a.batch}")
    torch.set_num_threads(a.threads)
    if a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = Path(a.model).resolve()
    defaults = model_defaults(model, a.size, a.frames)
    items = held_out(a.limit)
    if a.save_gifs:
        os.makedirs(a.save_gifs, exist_ok=True)
    report = {"model": os.path.relpath(model, ROOT), "versions": versions(), "torch_threads": a.threads,
              "device": a.device, "batch": a.batch, "defaults": defaults,
              "metric_constants": {k: v for k, v in globals().items() if k.isupper() and isinstance(v, (int, float, tuple))}}
    t_start = time.time()

    if a.engine:
        cases = Path(a.cases_dir).resolve()
        chosen = held_out(a.engine)
        t0 = time.time()
        if a.reuse_cases and (cases / "cases.json").exists():
            print(f"reusing the case set in {cases}")
            names = [c["name"] for c in json.loads((cases / "cases.json").read_text())["cases"]]
            chosen = [held_out()[int(re.match(r"heldout(\d+)_", n).group(1))] for n in names]
        else:
            print(f"writing {len(chosen)} pipeline cases to {cases}")
            write_engine_cases(cases, model, chosen, defaults)
        report.update(mode="engine", cases_dir=str(cases), items=[it["index"] for it in chosen],
                      cases_seconds=round(time.time() - t0, 1))
        report["engine"] = run_engine(cases, a.precision)
        errs = {}
        for o in report["engine"]["outputs"]:
            if "max_abs_err" in o:
                # Tensor names are CASE.OUTPUT: the maximum over cases per output.
                e = errs.setdefault(o["output"].rsplit(".", 1)[-1], [0.0, 0.0])
                e[0] = max(e[0], o["max_abs_err"])
                e[1] = max(e[1], o["max_abs_err"] / o["tolerance"] if o["tolerance"] else 0.0)
        report["engine"]["max_error_by_output"] = {k: {"max_abs_err": v[0], "max_err_over_tolerance": v[1]}
                                                   for k, v in errs.items()}
        by_case = {}
        for o in report["engine"]["outputs"]:
            by_case[o["case"]] = by_case.get(o["case"], True) and o["ok"]
        report["engine"]["cases_passed"] = sum(by_case.values())
        report["engine"]["cases_failed"] = len(chosen) - sum(by_case.values())
        print()
        print(f"{'output':<14} {'max |err|':>10} {'max err/tol':>11}   (over {len(chosen)} cases)")
        for k, (e, r) in errs.items():
            print(f"{k:<14} {e:10.3e} {r:11.3f}")
        print(f"{report['engine']['summary']} outputs; {report['engine']['cases_passed']}/{len(chosen)} cases pass "
              f"(engine {report['engine']['seconds']:.0f}s, exit {report['engine']['exit_code']})")
    elif a.truth:
        print(f"ground truth: {len(items)} clips")
        t0 = time.time()
        clips = evaluate(items, lambda chunk: render_truths(chunk, defaults["frames"], defaults["width"], a.device),
                         defaults, a.save_gifs, batch=a.batch, device=a.device)
        wall = time.time() - t0
        report.update(mode="truth", settings=[{"steps": None, "guidance": None, "rates": rates(clips),
                                               "seconds_per_clip": wall / len(items), "clips": clips}])
        print_table(report["settings"])
    else:
        pipe = load_pipeline(model).to(a.device)
        settings = []
        for steps in a.steps or [defaults["steps"]]:
            for guidance in a.guidance or [defaults["guidance"]]:
                label = f"s{steps}-g{guidance}-" if (a.steps or a.guidance) else ""
                settings.append(run_generate(model, items, defaults, steps, guidance, a.device, a.batch,
                                             a.save_gifs, label, pipe))
        report.update(mode="generate", settings=settings)
        print_table(settings)

    report["wall_s"] = round(time.time() - t_start, 1)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {a.out} ({report['wall_s']:.0f}s)")
    if a.engine and report["engine"]["exit_code"] != 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
