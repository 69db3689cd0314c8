"""Decides whether a training window's weights replace the shipped ones.

Both models run the held-out split of tools/eval/eval.py (same prompts,
seeds, steps and guidance, on the same device). The candidate ships only
when it gets more held-out clips right in all (colour + direction +
camera) than the shipped model and no metric loses more than --max-drop
clips; otherwise the shipped weights stay. Either way the window is logged
in the model card (motif.json's "windows" and the table in README.md):
minutes, steps, clips seen, held-out loss and the metrics of both models.

The exported folder holds f16 weights only; every file must be under
--max-file-mb (the limit on what a GPU machine sends back) and the whole
under --max-total-mb, or nothing is written.

    python3 tools/train/ship.py runs/window --device cuda --batch 48
    python3 tools/train/ship.py runs/window --shipped assets/models/default --out $OUT/default

--out defaults to --shipped (replaced in place through a temporary folder).
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools", "eval"))

METRICS = ("colour", "direction", "camera")
TABLE_START = "<!-- windows: ship.py keeps this table -->"
TABLE_END = "<!-- /windows -->"
TABLE_HEAD = ("| window (UTC) | device | minutes | steps | clips seen | held-out loss | colour | direction | camera "
              "| shipped |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")


class ShipError(Exception):
    pass


def decide(candidate, shipped, max_drop=2):
    """(ships, reason) from two eval.py `rates` dicts."""
    def total(r):
        return sum(r[m]["correct"] for m in METRICS)
    for m in METRICS:
        if candidate[m]["total"] != shipped[m]["total"]:
            raise ShipError(f"the two evaluations differ in size: {m} over {candidate[m]['total']} clips "
                            f"for the candidate, {shipped[m]['total']} for the shipped model")
    drops = [f"{m} {shipped[m]['correct']}->{candidate[m]['correct']}" for m in METRICS
             if shipped[m]["correct"] - candidate[m]["correct"] > max_drop]
    c, s = total(candidate), total(shipped)
    if drops:
        return False, f"a metric dropped by more than {max_drop} clips ({', '.join(drops)})"
    if c <= s:
        return False, f"{c} held-out checks right against the shipped model's {s}: not better"
    return True, f"{c} held-out checks right against the shipped model's {s}"


def check_sizes(folder, max_file_mb, max_total_mb):
    """Every file (links not followed) under the limits, or ShipError."""
    total, big = 0, []
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            size = os.lstat(path).st_size
            total += size
            if size >= max_file_mb * 1e6:
                big.append(f"{os.path.relpath(path, folder)} ({size / 1e6:.1f} MB)")
    if big:
        raise ShipError(f"{folder}: expected every file under {max_file_mb} MB, found {', '.join(big)}")
    if total > max_total_mb * 1e6:
        raise ShipError(f"{folder}: expected at most {max_total_mb} MB in all, found {total / 1e6:.1f} MB")
    return total


def weights_digest(folder):
    h = hashlib.sha256()
    for part in ("unet", "text_encoder", "vae"):
        for root, _, files in sorted(os.walk(os.path.join(folder, part))):
            for f in sorted(files):
                if f.endswith(".safetensors"):
                    with open(os.path.join(root, f), "rb") as fh:
                        h.update(fh.read())
    return h.hexdigest()[:16]


def fmt_rate(r):
    return f"{r['correct']}/{r['total']}" if r else "-"


def table_row(w):
    loss = w.get("heldout_loss_start"), w.get("heldout_loss_end")
    loss_cell = f"{loss[0]:.4f} → {loss[1]:.4f}" if None not in loss else "-"
    cand, ship = w.get("candidate_rates", {}), w.get("shipped_rates", {})
    cells = [f"{fmt_rate(cand.get(m))} (was {fmt_rate(ship.get(m))})" for m in METRICS]
    return (f"| {w.get('start', '-')} | {w.get('device', '-')} | {w.get('minutes', 0):.1f} | {w.get('steps', 0):,} "
            f"| {w.get('clips_seen', 0):,} | {loss_cell} | {' | '.join(cells)} | {'yes' if w.get('shipped') else 'no'} |")


def log_card(folder, windows):
    """Rewrites the table of windows in folder/README.md (added at the end
    of the card the first time) from `windows`."""
    path = os.path.join(folder, "README.md")
    text = open(path).read() if os.path.exists(path) else "# motif-default — model card\n"
    table = "\n".join([TABLE_START, TABLE_HEAD] + [table_row(w) for w in windows] + [TABLE_END])
    if TABLE_START in text and TABLE_END in text:
        a = text.index(TABLE_START)
        b = text.index(TABLE_END) + len(TABLE_END)
        text = text[:a] + table + text[b:]
    else:
        text = text.rstrip("\n") + ("\n\n## Training windows\n\nEach GPU window continues from the shipped weights "
                                    "(tools/train/gpu_window.sh); its weights ship only when they beat the shipped "
                                    "ones on the held-out split (tools/train/ship.py).\n\n") + table
    with open(path + ".tmp", "w") as f:
        f.write(text.rstrip("\n") + "\n")
    os.replace(path + ".tmp", path)


def write_motif_json(folder, windows):
    path = os.path.join(folder, "motif.json")
    try:
        card = json.load(open(path))
    except (OSError, ValueError) as e:
        raise ShipError(f"{path}: expected the model's motif.json ({e})") from None
    card["windows"] = windows
    with open(path + ".tmp", "w") as f:
        json.dump(card, f, indent=1)
    os.replace(path + ".tmp", path)


def evaluate(model, device, batch, limit, size, frames):
    import eval as ev
    defaults = ev.model_defaults(model, size, frames)
    setting = ev.run_generate(model, ev.held_out(limit), defaults, defaults["steps"], defaults["guidance"],
                              device, batch)
    return setting


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="the window's train.py --out folder")
    ap.add_argument("--shipped", default=os.path.join(ROOT, "assets", "models", "default"))
    ap.add_argument("--out", help="where the resulting model folder goes (default: --shipped, in place)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1, help="clips generated at once")
    ap.add_argument("--limit", type=int, help="only N held-out clips (a dry run; never for the record)")
    ap.add_argument("--size", type=int, help="frame size instead of motif.json's (a dry run)")
    ap.add_argument("--frames", type=int, help="frames instead of motif.json's (a dry run)")
    ap.add_argument("--max-drop", type=int, default=2, help="clips any one metric may lose")
    ap.add_argument("--max-file-mb", type=float, default=16.0)
    ap.add_argument("--max-total-mb", type=float, default=25.0)
    ap.add_argument("--report", help="JSON file for the decision and both evaluations")
    a = ap.parse_args(argv)
    import torch
    import export
    if a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    shipped = os.path.abspath(a.shipped)
    out = os.path.abspath(a.out or a.shipped)
    cfg_path = os.path.join(a.run, "configs.json")
    try:
        train_cfg = json.load(open(cfg_path)).get("train", {})
    except (OSError, ValueError) as e:
        raise ShipError(f"{cfg_path}: expected the window's configs.json from train.py ({e})") from None
    window = dict(train_cfg.get("window", {}))
    if not window:
        raise ShipError(f"{cfg_path}: no 'window' record; was the run made by train.py --resume-from?")
    try:
        old_card = json.load(open(os.path.join(shipped, "motif.json")))
    except (OSError, ValueError) as e:
        raise ShipError(f"{shipped}/motif.json: expected the shipped model's card ({e})") from None

    # The candidate is exported first (beside --out, in a scratch folder),
    # so that what is evaluated is exactly the f16 folder that would ship.
    scratch = out.rstrip("/") + ".candidate"
    t0 = time.time()
    export.export(a.run, scratch)
    cand = evaluate(scratch, a.device, a.batch, a.limit, a.size, a.frames)
    base = evaluate(shipped, a.device, a.batch, a.limit, a.size, a.frames)
    ships, reason = decide(cand["rates"], base["rates"], a.max_drop)
    if a.limit or a.size or a.frames:
        ships, reason = False, f"dry run (--limit/--size/--frames): never ships; would have: {reason}"
    window.update(candidate_rates=cand["rates"], shipped_rates=base["rates"], shipped=ships, reason=reason,
                  eval_device=a.device, eval_seconds=round(time.time() - t0, 1),
                  shipped_before=weights_digest(shipped))
    windows = list(old_card.get("windows", [])) + [window]
    print(f"decision: {'ship' if ships else 'keep the shipped weights'} — {reason}", flush=True)

    if ships:
        size = check_sizes(scratch, a.max_file_mb, a.max_total_mb)
        # The card's prose stays; the table of windows follows.
        if os.path.exists(os.path.join(shipped, "README.md")):
            shutil.copy(os.path.join(shipped, "README.md"), os.path.join(scratch, "README.md"))
        write_motif_json(scratch, windows)
        log_card(scratch, windows)
        check_sizes(scratch, a.max_file_mb, a.max_total_mb)
        if os.path.exists(out) and out != shipped:
            shutil.rmtree(out)
        if out == shipped:
            old = shipped.rstrip("/") + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(shipped, old)
            os.replace(scratch, shipped)
            shutil.rmtree(old)
        else:
            os.replace(scratch, out)
        print(f"wrote {out}: {size / 1e6:.1f} MB", flush=True)
    else:
        shutil.rmtree(scratch, ignore_errors=True)
        if out != shipped:
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(shipped, out, symlinks=True)
        write_motif_json(out, windows)
        log_card(out, windows)
    if a.report:
        with open(a.report, "w") as f:
            json.dump(dict(decision=ships, reason=reason, window=window, candidate=cand, shipped=base), f, indent=1)
    return 0 if ships else 3


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ShipError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
