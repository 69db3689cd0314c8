"""Turns a training run (train.py --out) into the diffusers folder that ships
as Motif's bundled model: model_index.json, unet/ (UNetMotionModel),
text_encoder/, tokenizer/ (the real CLIP vocabulary), vae/, scheduler/
(DDIM, trailing spacing, v-prediction, zero terminal SNR), and motif.json
(defaults and the latent-to-RGB preview projection, fitted here).

    python3 tools/train/export.py runs/full assets/models/default
"""

import argparse
import json
import os
import random
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402
import world  # noqa: E402

DEFAULTS = dict(width=128, height=128, frames=16, steps=8, guidance=5.0, fps=8, negative="")


def load(run):
    from diffusers import AutoencoderKL, UNetMotionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = json.load(open(os.path.join(run, "configs.json")))
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    vae = AutoencoderKL(**strip(cfg["vae"]))
    vae.load_state_dict({k: v.float() for k, v in load_file(os.path.join(run, "vae.safetensors")).items()})
    te = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    missing, unexpected = te.load_state_dict(
        {k: v.float() for k, v in load_file(os.path.join(run, "text_encoder.safetensors")).items()}, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
    unet = UNetMotionModel(**strip(cfg["unet"]))
    unet.load_state_dict({k: v.float() for k, v in load_file(os.path.join(run, "unet.safetensors")).items()})
    return cfg, vae.eval(), te.eval(), unet.eval()


@torch.no_grad()
def latent_rgb(vae, n=8, seed=7):
    """Least-squares fit of RGB (in [-1, 1], at latent resolution) from the
    scaled latents: [C][3] factors and a bias."""
    rng = random.Random(seed)
    clips, _, _ = world.make_batch(rng, n, frames=4, size=vae.config.sample_size)
    x = clips.flatten(0, 1) * 2 - 1
    z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    small = torch.nn.functional.avg_pool2d(x, x.shape[-1] // z.shape[-1])
    A = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), torch.ones(z.numel() // z.shape[1], 1)], 1)
    B = small.permute(0, 2, 3, 1).reshape(-1, 3)
    sol = torch.linalg.lstsq(A, B).solution
    return sol[:-1].tolist(), sol[-1].tolist()


def export(run, out, card_extra=None):
    """Writes the diffusers folder for `run` at `out` (replaced as a whole,
    through a temporary folder beside it); returns its size in bytes."""
    from diffusers import DDIMScheduler
    cfg, vae, te, unet = load(run)
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    vae.half().save_pretrained(os.path.join(tmp, "vae"), safe_serialization=True)
    te.half().save_pretrained(os.path.join(tmp, "text_encoder"), safe_serialization=True)
    unet.half().save_pretrained(os.path.join(tmp, "unet"), safe_serialization=True)
    DDIMScheduler(**train.SCHED_CFG).save_pretrained(os.path.join(tmp, "scheduler"))
    # The tokenizer is the repository's copy of CLIP's (assets/clip_tokenizer):
    # linked when the folder is written inside the repository, else copied.
    final = os.path.abspath(out)
    if final.startswith(train.ROOT + os.sep):
        os.symlink(os.path.relpath(train.TOKENIZER, final), os.path.join(tmp, "tokenizer"))
    else:
        shutil.copytree(train.TOKENIZER, os.path.join(tmp, "tokenizer"))
    import diffusers
    json.dump({
        "_class_name": "AnimateDiffPipeline", "_diffusers_version": diffusers.__version__,
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNetMotionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }, open(os.path.join(tmp, "model_index.json"), "w"), indent=1)
    factors, bias = latent_rgb(vae.float())
    card = {
        "name": "motif-default",
        "description": "Motif's bundled model: a small AnimateDiff-architecture text-to-video model trained "
                       "from scratch on Motif's synthetic world of shapes, scenes, camera moves and styles.",
        "license": "Apache-2.0 (weights and training code); the CLIP tokenizer vocabulary is OpenAI's (MIT)",
        "defaults": DEFAULTS,
        # `--camera` adds the caption words the model learnt for each move.
        "camera_prompts": {c: world.CAMERA_PHRASES[c][0] for c in world.CAMERAS[1:]},
        "latent_rgb_factors": [[round(v, 5) for v in row] for row in factors],
        "latent_rgb_bias": [round(v, 5) for v in bias],
        "training": cfg.get("train", {}),
    }
    if card_extra:
        card.update(card_extra)
    json.dump(card, open(os.path.join(tmp, "motif.json"), "w"), indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    total = 0
    for root, _, files in os.walk(out):
        for f in files:
            total += os.lstat(os.path.join(root, f)).st_size
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a train.py --out folder")
    ap.add_argument("out", help="the diffusers folder to write (replaced)")
    ap.add_argument("--card", help="JSON merged into motif.json (notes, figures)")
    a = ap.parse_args()
    total = export(a.run, a.out, json.load(open(a.card)) if a.card else None)
    print(f"wrote {a.out}: {total / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
