"""Motif against PyTorch + diffusers, same machine, same weights, same
settings, one run: `motif bench --model` and tools/bench/torch_side.py are
run one after the other (never at once) and their figures printed side by
side with the ratio motif / PyTorch (below 1: Motif is faster).

    # this machine's bundled model (CPU: Motif on the software driver,
    # PyTorch on the CPU), 4 and 8 steps:
    python3 tools/bench/compare.py --model assets/models/default --steps 4,8
    # a GPU machine, the full SD1.5 + AnimateDiff size, random weights:
    python3 tools/bench/compare.py --full /tmp/full --steps 4,25

Peak memory: on CUDA, PyTorch's torch.cuda.max_memory_allocated and Motif's
buffer-pool peak, plus both processes' peak GPU memory as nvidia-smi saw it
(sampled every 100 ms); on the CPU, each process's peak resident memory.
The table (markdown) and the raw reports (JSON) go to --out.

Load: /proc/loadavg is read at the start (and noted again at the end), and
/proc/stat's CPU counters at the start and the end give the share of CPU
time the hypervisor gave to other guests while both sides ran (steal: a
virtual machine's own load average does not see it). The figures are
labelled "quiet" only when the 1-minute load average at the start is at
most 0.5 and the steal at most 5 %; else they are written marked "under
load", in the table and in the JSON, whatever was asked. --quiet asks for a
quiet run: the figures are still written (marked "under load") but the
script exits with status 2 when the machine was not quiet.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The 1-minute load average above which a figure is not a quiet machine's.
QUIET_LOAD = 0.5
# The share of CPU time stolen by the hypervisor above which it is not either.
QUIET_STEAL = 0.05


def load_average():
    """The 1-, 5- and 15-minute load averages from /proc/loadavg (None
    where the system has none)."""
    try:
        fields = Path("/proc/loadavg").read_text().split()
        return [float(v) for v in fields[:3]]
    except (OSError, ValueError, IndexError):
        return None


def cpu_times():
    """The whole machine's CPU time counters from /proc/stat's first line
    (user, nice, system, idle, iowait, irq, softirq, steal, ...), None where
    there is none."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        if fields[0] != "cpu" or len(fields) < 9:
            return None
        return [int(v) for v in fields[1:]]
    except (OSError, ValueError, IndexError):
        return None


def steal_share(start, end):
    """The share of the CPU time between two cpu_times() readings that the
    hypervisor gave to other guests (None where either is unknown)."""
    if start is None or end is None:
        return None
    # guest and guest_nice (fields 9 and 10) are already counted in user and nice.
    total = sum(end[:8]) - sum(start[:8])
    return (end[7] - start[7]) / total if total > 0 else 0.0


def conditions(load, steal=0.0):
    """"quiet" where the 1-minute load average is at most QUIET_LOAD and the
    steal at most QUIET_STEAL, else "under load" (also where either could
    not be read: a figure is only called quiet on evidence)."""
    quiet = (load is not None and load[0] <= QUIET_LOAD
             and steal is not None and steal <= QUIET_STEAL)
    return "quiet" if quiet else "under load"


class GpuMemory:
    """Peak `memory.used` of GPU 0 while a process runs, from nvidia-smi."""

    def __init__(self):
        self.ok = shutil.which("nvidia-smi") is not None
        self.peak = 0
        self.base = self.sample() if self.ok else 0
        self.stop = threading.Event()
        self.thread = None

    def sample(self):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                  "-i", "0"], capture_output=True, text=True, timeout=5).stdout
            return int(out.split()[0]) << 20
        except Exception:
            return 0

    def __enter__(self):
        if self.ok:
            def loop():
                while not self.stop.is_set():
                    self.peak = max(self.peak, self.sample())
                    time.sleep(0.1)
            self.thread = threading.Thread(target=loop, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *a):
        self.stop.set()
        if self.thread:
            self.thread.join()

    def used(self):
        return max(0, self.peak - self.base) if self.ok else None


def run_side(name, cmd, env=None, timeout=None):
    """Runs one side; returns (report, peak RSS bytes, peak GPU bytes, wall s)."""
    print(f"== {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.time()
    with GpuMemory() as mem:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
        timer = threading.Timer(timeout, p.kill) if timeout else None
        if timer:
            timer.start()
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
        if timer:
            timer.cancel()
    wall = time.time() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(f"{name} failed (exit {code})", file=sys.stderr)
        return None, usage.ru_maxrss * 1024, mem.used(), wall
    report = json.loads(out.strip().splitlines()[-1])
    return report, usage.ru_maxrss * 1024, mem.used(), wall


def fmt_s(v):
    if v is None or v != v:
        return "—"
    return f"{v * 1e3:.0f} ms" if v < 1 else f"{v:.2f} s"


def fmt_b(v):
    if not v:
        return "—"
    return f"{v / 2**30:.2f} GiB" if v >= 2**30 else f"{v / 2**20:.0f} MiB"


def table(motif, torch_, extra):
    rows = []

    def row(label, m, t, fmt=fmt_s):
        ratio = f"{m / t:.2f}×" if m and t and m == m and t == t else "—"
        rows.append(f"| {label} | {fmt(m)} | {fmt(t)} | {ratio} |")

    get = lambda r, k: (r or {}).get(k)
    for key, label in [("load_s", "load"), ("first_preview_cold_s", "first preview, cold (from load)"),
                       ("first_preview_warm_s", "first preview, warm"), ("clip_encode_s", "CLIP encode (2 prompts)"),
                       ("unet_step_s", "UNet step (batch 2)"), ("vae_decode_s", "VAE decode (all frames)")]:
        row(label, get(motif, key), get(torch_, key))
    gm = dict(map(tuple, get(motif, "generate_s") or []))
    gt = dict(map(tuple, get(torch_, "generate_s") or []))
    for steps in sorted(set(gm) | set(gt)):
        row(f"whole generation, {steps} steps", gm.get(steps), gt.get(steps))
    row("peak memory, allocator (Motif pool / torch.cuda)", get(motif, "peak_bytes"), get(torch_, "peak_bytes"), fmt_b)
    for label, (m, t) in extra.items():
        row(label, m, t, fmt_b)
    head = "| | Motif | PyTorch | Motif / PyTorch |\n| --- | ---: | ---: | ---: |"
    return head + "\n" + "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a diffusers AnimateDiff folder both sides load")
    src.add_argument("--full", metavar="DIR", help="write the random-weight full-size model to DIR (unless there) and use it")
    ap.add_argument("--motif", default=str(ROOT / "target" / "release" / "motif"), help="the motif binary")
    ap.add_argument("--size", help="WIDTHxHEIGHTxFRAMES (default: the model card's, else 512x512x16)")
    ap.add_argument("--steps", default="4,25")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--motif-args", default="", help="extra global flags for motif (e.g. '--precision f16')")
    ap.add_argument("--only", choices=["motif", "torch"], help="run one side")
    ap.add_argument("--timeout", type=float, help="seconds each side may take")
    ap.add_argument("--out", default="bench-out", help="folder for table.md and reports.json")
    ap.add_argument("--quiet", action="store_true",
                    help=f"the figures are for a quiet machine: exit 2 if the 1-minute load average at the start "
                         f"is above {QUIET_LOAD} or the hypervisor stole more than {QUIET_STEAL:.0%} of the CPU time")
    args = ap.parse_args()
    load_start = load_average()
    cpu_start = cpu_times()

    model = args.model
    if args.full:
        model = args.full
        if not (Path(model) / "model_index.json").is_file():
            subprocess.run([sys.executable, str(ROOT / "tools/bench/torch_side.py"), "--make-full", model], check=True)
    common = ["--steps", args.steps, "--guidance", str(args.guidance), "--iters", str(args.iters)]
    if args.size:
        common += ["--size", args.size]
    motif, torch_ = None, None
    mem = {}
    if args.only != "torch":
        motif, rss_m, gpu_m, wall_m = run_side(
            "motif", [args.motif, *args.motif_args.split(), "bench", "--model", model, "--json", *common],
            timeout=args.timeout)
    if args.only != "motif":
        torch_, rss_t, gpu_t, wall_t = run_side(
            "pytorch", [sys.executable, str(ROOT / "tools/bench/torch_side.py"), "--model", model, "--json", *common],
            timeout=args.timeout)
    if args.only is None:
        mem["peak resident memory (process)"] = (rss_m, rss_t)
        if gpu_m is not None:
            mem["peak GPU memory (nvidia-smi, process)"] = (gpu_m, gpu_t)

    load_end = load_average()
    steal = steal_share(cpu_start, cpu_times())
    label = conditions(load_start, steal)
    fmt_load = lambda l: " ".join(f"{v:.2f}" for v in l) if l else "unknown"
    fmt_steal = f"{steal:.1%}" if steal is not None else "unknown"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = [
        f"conditions: **{label}** (1-minute load average at the start "
        f"{f'{load_start[0]:.2f}' if load_start else 'unknown'}, steal {fmt_steal}; "
        f"quiet means at most {QUIET_LOAD} and {QUIET_STEAL:.0%})",
        f"load average (/proc/loadavg, 1/5/15 min): {fmt_load(load_start)} at the start, {fmt_load(load_end)} at the end",
        f"steal (/proc/stat, CPU time given to other guests while both sides ran): {fmt_steal}",
        f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        f"Motif: {(motif or {}).get('adapter', '—')}, {(motif or {}).get('precision', '—')}",
        f"PyTorch: {(torch_ or {}).get('torch', '—')} on {(torch_ or {}).get('device', '—')}, "
        f"{(torch_ or {}).get('dtype', '—')}, {(torch_ or {}).get('threads', '—')} threads",
        f"workload: {model}, {((motif or torch_) or {}).get('workload')}",
        f"command: python3 tools/bench/compare.py {' '.join(sys.argv[1:])}",
    ]
    text = "\n".join(f"- {h}" for h in header) + "\n\n" + table(motif, torch_, mem) + "\n"
    print(text)
    (out / "table.md").write_text(text)
    (out / "reports.json").write_text(json.dumps({
        "conditions": label,
        "load_average": {"start": load_start, "end": load_end, "quiet_at_most": QUIET_LOAD},
        "steal": {"share": steal, "quiet_at_most": QUIET_STEAL},
        "motif": motif, "pytorch": torch_, "memory": mem}, indent=1))
    if (args.only != "torch" and motif is None) or (args.only != "motif" and torch_ is None):
        sys.exit(1)
    if args.quiet and label != "quiet":
        print(f"compare.py: refusing to label these figures quiet: the load average was "
              f"{fmt_load(load_start)} at the start and the steal {fmt_steal} (quiet: at most "
              f"{QUIET_LOAD} and {QUIET_STEAL:.0%}); they are written marked \"under load\"",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
