"""Gathers the results of one tools/bench/gpu_run.sh run into one JSON file and
one markdown table, Motif beside PyTorch with the ratio (below 1: Motif is
faster), and writes them to docs/bench/ and into docs/PERFORMANCE.md between
the markers `<!-- gpu_run:begin -->` and `<!-- gpu_run:end -->`.

    python3 tools/bench/gpu_summary.py RUN_DIR [--docs docs] [--name NAME]

RUN_DIR is gpu_run.sh's output folder. A stage that did not run or failed
shows as `-` with nothing made up in its place.
"""

import argparse
import json
import re
import sys
from pathlib import Path


def load_json(path):
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    # A JSON report may follow progress lines on the same stream.
    for start in [0] + [m.start() for m in re.finditer(r"^\{", text, re.M)]:
        try:
            return json.loads(text[start:])
        except ValueError:
            continue
    return None


def torch_line(path, pattern):
    """Milliseconds from a torch_side.py line such as `... : 0.181 ms, 757.0 TFLOP/s`."""
    try:
        for line in Path(path).read_text().splitlines():
            if re.search(pattern, line):
                m = re.search(r"([\d.]+) ms", line)
                if m:
                    return float(m.group(1))
    except OSError:
        pass
    return None


def tuned_ms(tune, op, shape_prefix):
    """The chosen variant's time on the tuner's class whose shape starts with `shape_prefix`."""
    for r in tune or []:
        if r.get("op") == op and r.get("shape", "").startswith(shape_prefix) and r.get("chosen"):
            for t in r["trials"]:
                if t["variant"] == r["chosen"]:
                    return t["ms"], t["variant"]["kernel"]
    return None, None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--docs", default="docs")
    ap.add_argument("--name", help="file stem under docs/bench (default: from the adapter)")
    args = ap.parse_args()
    run = Path(args.run_dir)
    info = (run / "info.txt").read_text() if (run / "info.txt").exists() else ""
    adapter = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("chosen")), "unknown")
    dry = (run / "DRY_RUN").exists()
    tune = load_json(run / "tune.json")
    torch_attn = load_json(run / "torch_attention.json") or {}
    full = load_json(run / "full" / "reports.json") or {}
    motif_full, torch_full = full.get("motif") or {}, full.get("pytorch") or {}
    wan = load_json(run / "wan.json") or {}
    torch_wan = load_json(run / "torch_wan.json") or {}

    rows = []

    def row(what, motif_ms, torch_ms, note=""):
        ratio = motif_ms / torch_ms if motif_ms and torch_ms else None
        rows.append({"what": what, "motif_ms": motif_ms, "torch_ms": torch_ms, "ratio": ratio, "note": note})

    ms, kernel = tuned_ms(tune, "matmul", "4096x4096x4096")
    row("matmul 4096^3 f16 (cuBLAS)", ms, torch_line(run / "torch_matmul.txt", r"torch matmul"), kernel or "")
    ms, kernel = tuned_ms(tune, "attention", "1x 4096 tokens 8h x 40")
    row("attention 4,096 tokens, 8 x 40 (SDPA)", ms, torch_attn.get("4096"), kernel or "")
    ms, kernel = tuned_ms(tune, "attention", "1x 32760 tokens 12h x 128")
    row("attention 32,760 tokens, 12 x 128 (SDPA)", ms, torch_attn.get("32760"), kernel or "")
    sec = lambda d, k: d.get(k) * 1e3 if isinstance(d.get(k), (int, float)) else None
    wl = motif_full.get("workload") or torch_full.get("workload") or {}
    size = f"{wl.get('width', '?')}x{wl.get('height', '?')}x{wl.get('frames', '?')}"
    wan_size = "x".join(str(v) for v in (wan.get("size") or torch_wan.get("size") or ["?"]))
    row(f"AnimateDiff UNet step {size}", sec(motif_full, "unet_step_s"), sec(torch_full, "unet_step_s"))
    row(f"SD VAE decode {size}", sec(motif_full, "vae_decode_s"), sec(torch_full, "vae_decode_s"))
    row(f"Wan2.1-1.3B step {wan_size} (random weights)", sec(wan, "step_s"), sec(torch_wan, "step_s"))
    gens_m = dict(tuple(g) for g in motif_full.get("generate_s", []))
    gens_t = dict(tuple(g) for g in torch_full.get("generate_s", []))
    for steps in sorted(set(gens_m) | set(gens_t)):
        m, t = gens_m.get(steps), gens_t.get(steps)
        row(f"AnimateDiff generation, {steps} steps", m * 1e3 if m else None, t * 1e3 if t else None)

    fmt = lambda v: "-" if v is None else f"{v:.3f}" if v < 10 else f"{v:.1f}"
    lines = [f"Adapter: {adapter}" + (" (dry run: tiny sizes, not a measurement)" if dry else ""), "",
             "| what | Motif ms | PyTorch ms | Motif / PyTorch | kernel |", "| --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        ratio = "-" if r["ratio"] is None else "%.2fx" % r["ratio"]
        lines.append(f"| {r['what']} | {fmt(r['motif_ms'])} | {fmt(r['torch_ms'])} | {ratio} | {r['note']} |")
    def verdict(t):
        consts = "".join(f" {k}={v:g}" for k, v in sorted(t["variant"].get("constants", {}).items()))
        state = "ok" if t["correct"] else "WRONG" if t["error"] is None else "failed"
        ms = "-" if t["ms"] is None else "%.3f ms" % t["ms"]
        return f"{t['variant']['kernel']}{consts} {ms} {state}"

    tuned = []
    for r in tune or []:
        chosen = r.get("chosen")
        trials = ", ".join(verdict(t) for t in r["trials"])
        tuned.append(f"| {r['op']} | {r['class']} | {r['shape']} | {chosen['kernel'] if chosen else 'none right'} | {trials} |")
    if tuned:
        lines += ["", "Tuner (`motif bench --tune`): fastest correct variant per shape class", "",
                  "| op | class | measured shape | chosen | trials |", "| --- | --- | --- | --- | --- |"] + tuned
    table = "\n".join(lines) + "\n"
    short = re.sub(r"^\[\d+\]\s*", "", adapter).split(" (")[0]
    name = args.name or re.sub(r"[^a-z0-9]+", "-", short.lower()).strip("-") + ("-dry-run" if dry else "") + "-gpu-run"
    docs = Path(args.docs)
    (docs / "bench").mkdir(parents=True, exist_ok=True)
    summary = {"adapter": adapter, "dry_run": dry, "rows": rows, "tune": tune}
    (docs / "bench" / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (docs / "bench" / f"{name}.md").write_text(table)
    (run / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (run / "summary.md").write_text(table)
    perf = docs / "PERFORMANCE.md"
    if perf.exists() and not dry:
        text = perf.read_text()
        block = (f"<!-- gpu_run:begin -->\n`bash tools/bench/gpu_run.sh` on {adapter} "
                 f"(docs/bench/{name}.json):\n\n{table}<!-- gpu_run:end -->")
        if "<!-- gpu_run:begin -->" in text:
            text = re.sub(r"<!-- gpu_run:begin -->.*?<!-- gpu_run:end -->", lambda _: block, text, flags=re.S)
        else:
            text = text.rstrip("\n") + "\n\n## One-command GPU run\n\n" + block + "\n"
        perf.write_text(text)
    print(table)


if __name__ == "__main__":
    sys.exit(main())
