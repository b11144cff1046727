"""The embedded main job over training seeds and thread counts: what a user's `make main` gets, with its spread.

    python benchmarks/embedded_seeds.py run --seed 1 --threads 2 --workdir /tmp/seed1   # a fresh clone, make main
    python benchmarks/embedded_seeds.py collect /tmp/seed1 --seed 1 --threads 2          # a finished workspace
    python benchmarks/embedded_seeds.py table                                           # -> results/embedded_seeds.md

``run`` clones this repository's HEAD into ``--workdir``, sets the training seeds (``train_tokenizer.embedded.seed``
and ``seed`` of both embedded generators; seed 0 leaves params.yaml as committed), runs ``make main`` with
``OMP_NUM_THREADS`` set to ``--threads`` and records the headline metrics. Every run appends one record to
``results/embedded_runs.json`` (seed, threads, commit, machine, wall time, metrics); ``table`` writes
``results/embedded_seeds.md``: each run, then per thread count the mean, standard deviation (n - 1) and min-max
of every metric over seeds. Records of different machines are kept apart: float rounding differs between
machines of the same kind, so the same seed gives different numbers on them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nbp.io import write_text  # noqa: E402

RUNS = ROOT / "results" / "embedded_runs.json"
TABLE = ROOT / "results" / "embedded_seeds.md"
# (label, metrics.json of the workspace, key, decimals)
METRICS = [("PSNR dB", "eval_tokenizer/embedded", "psnr", 2), ("SSIM", "eval_tokenizer/embedded", "ssim", 3),
           ("rFVD", "eval_tokenizer/embedded", "rfvd", 1),
           ("val loss NBP", "train_generator/embedded_nbp", "val_loss", 3),
           ("val loss NTP", "train_generator/embedded_ntp", "val_loss", 3),
           ("gFVD NBP", "eval_generator/embedded_nbp", "gfvd", 1), ("gFVD NTP", "eval_generator/embedded_ntp", "gfvd", 1)]
SEED_KEYS = [("train_tokenizer", "embedded"), ("train_generator", "embedded_nbp"), ("train_generator", "embedded_ntp")]


def set_seeds(params: Path, seed: int) -> None:
    """Set the training seed of the embedded tokenizer and both generators (round trip: comments stay)."""
    from nbp.smoke import _roundtrip

    y = _roundtrip()
    doc = y.load(params.read_text())
    for section, entry in SEED_KEYS:
        doc[section][entry]["seed"] = seed
    with open(params, "w") as f:
        y.dump(doc, f)


def machine() -> str:
    """The CPU as /proc/cpuinfo names it, with family/model (same-named EPYCs differ: Zen 3 has no AVX-512) and a
    short hash of its feature flags: two virtual machines of the same model gave different numbers for the same
    seed (the kernels follow the instruction sets a host exposes), and one of another model gave the same."""
    info: dict[str, str] = {}
    if Path("/proc/cpuinfo").exists():
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = ln.partition(":")
            info.setdefault(k.strip(), v.strip())
    name = info.get("model name") or platform.processor() or platform.machine()
    flags = sorted(info.get("flags", "").split())
    avx = "AVX-512" if "avx512f" in flags else "no AVX-512"
    tag = hashlib.sha1(" ".join(flags).encode()).hexdigest()[:6] if flags else "?"
    return (f"{name} (family {info.get('cpu family', '?')} model {info.get('model', '?')}, {avx}, flags {tag}), "
            f"{os.cpu_count()} cores")


def record(workspace: Path, seed: int, threads: int, wall_s: float | None) -> dict:
    out = workspace / "out"
    rec = {"seed": seed, "threads": threads, "machine": machine(), "wall_s": wall_s,
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=workspace, capture_output=True,
                                    text=True).stdout.strip(),
           "date": time.strftime("%Y-%m-%d"), "metrics": {}}
    for label, stage, key, _ in METRICS:
        rec["metrics"][label] = json.loads((out / stage / "metrics.json").read_text())[key]
    return rec


def append(rec: dict) -> None:
    runs = json.loads(RUNS.read_text()) if RUNS.exists() else []
    runs = [r for r in runs if (r["seed"], r["threads"], r["machine"]) != (rec["seed"], rec["threads"], rec["machine"])]
    write_text(RUNS, json.dumps(runs + [rec], indent=1) + "\n")
    print(json.dumps(rec))


def run(args) -> int:
    work = Path(args.workdir)
    if work.exists():
        raise SystemExit(f"{work}: exists; give a new --workdir")
    subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
    if args.seed:
        set_seeds(work / "params.yaml", args.seed)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), NBP_PROGRESS="0")
    subprocess.run(["make", "setup"], cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)
    t0 = time.monotonic()
    with open(work / "main.log", "w") as log:
        rc = subprocess.run(["make", "main"], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        raise SystemExit(f"make main failed (exit {rc}): see {work / 'main.log'}")
    append(record(work, args.seed, args.threads, round(time.monotonic() - t0)))
    return 0


def _cell(v: float, d: int) -> str:
    return f"{v:.{d}f}"


def table(runs: list[dict]) -> str:
    """Markdown: every run, then per (machine, threads) mean +- std and min-max over its seeds."""
    labels = [m[0] for m in METRICS]
    digits = {m[0]: m[3] for m in METRICS}
    lines = ["# The embedded main job over training seeds (`benchmarks/embedded_seeds.py`)", "",
             "Each row is one fresh clone's `make main` with the training seeds set (`train_tokenizer.embedded.seed`, "
             "the embedded generators' `seed`); OMP_NUM_THREADS as given. 128 generated videos for gFVD, 64 "
             "validation clips for the tokenizer.", "",
             "| machine | threads | seed | commit | wall min | " + " | ".join(labels) + " |",
             "|" + "---|" * (5 + len(labels))]
    for r in sorted(runs, key=lambda r: (r["machine"], r["threads"], r["seed"])):
        wall = "—" if r.get("wall_s") is None else f"{r['wall_s'] / 60:.1f}"
        lines.append(f"| {r['machine']} | {r['threads']} | {r['seed']} | {r['commit']} | {wall} | "
                     + " | ".join(_cell(r["metrics"][k], digits[k]) for k in labels) + " |")
    notes = sorted({f"{r['commit']}: {r['note']}" for r in runs if r.get("note")})
    lines += [""] + [f"- {n}" for n in notes] if notes else []
    lines += ["", "Spread over seeds (same machine, same threads): mean ± standard deviation (n - 1), then min-max.", "",
              "| machine | threads | seeds | " + " | ".join(labels) + " |", "|" + "---|" * (3 + len(labels))]
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["machine"], r["threads"]), []).append(r)
    for (mach, threads), rs in sorted(groups.items()):
        seeds = sorted(r["seed"] for r in rs)
        cells = []
        for k in labels:
            v = [r["metrics"][k] for r in rs]
            d = digits[k]
            if len(v) < 2:
                cells.append(f"{_cell(v[0], d)} (one seed)")
            else:
                cells.append(f"{_cell(statistics.mean(v), d)} ± {_cell(statistics.stdev(v), d)} "
                             f"({_cell(min(v), d)}-{_cell(max(v), d)})")
        lines.append(f"| {mach} | {threads} | {', '.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="fresh clone, seeds set, make main, record")
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    r.add_argument("--workdir", required=True)
    c = sub.add_parser("collect", help="record a finished workspace (its out/ folder)")
    c.add_argument("workspace")
    c.add_argument("--seed", type=int, required=True)
    c.add_argument("--threads", type=int, required=True)
    c.add_argument("--wall-s", type=float, default=None)
    sub.add_parser("table", help="write results/embedded_seeds.md from results/embedded_runs.json")
    args = p.parse_args()
    if args.cmd == "run":
        return run(args)
    if args.cmd == "collect":
        append(record(Path(args.workspace), args.seed, args.threads, args.wall_s))
        return 0
    write_text(TABLE, table(json.loads(RUNS.read_text())))
    print(f"wrote {TABLE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
