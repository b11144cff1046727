"""I3D (FVD detector) throughput: clips per second at 16x224x224, per batch size.

Writes the ``i3d_throughput`` section of ``results/speed.md`` (one section per device type):

- the network alone on float [B, 3, 16, 224, 224] input (BatchNorm folded into the convs, as ``load_i3d`` does by
  default, and unfolded), after one warm-up pass per shape;
- the whole FVD feature path (``fvd_features_of_clips``: uint8 clips -> 224 resize -> I3D) on 64x64 clips of
  17 frames, as the embedded experiment's ``real_stats`` runs it.

    python benchmarks/i3d_throughput.py                 # CPU, batch sizes 1 4 8
    python benchmarks/i3d_throughput.py --device cuda --batch-sizes 8 16 32
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nbp.io import write_markdown_section
from nbp.metrics.detector import cached_i3d_weights
from nbp.metrics.fvd import fvd_features_of_clips
from nbp.metrics.i3d import load_i3d

KEY = "i3d_throughput"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clips_per_second(fn, n: int, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: kernels / oneDNN primitives for this shape
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return n / best


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"CPU, {torch.get_num_threads()} threads ({os.cpu_count()} cores visible{load}), torch {torch.__version__}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-unfused", action="store_true", help="skip the unfolded-BatchNorm rows")
    p.add_argument("--md", default="results/speed.md")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    weights = cached_i3d_weights()
    variants = [("folded BN (default)", load_i3d(weights, device))]
    if not a.no_unfused:
        variants.append(("unfolded BN", load_i3d(weights, device, fuse=False)))
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, model in variants:
        for bs in a.batch_sizes:
            x = (torch.rand(bs, 3, 16, 224, 224, generator=gen) * 2 - 1).to(device)

            def run(model=model, x=x):
                with torch.inference_mode():
                    model(x)

            rows.append(("network", name, bs, clips_per_second(run, bs, device, a.repeats)))
            print(rows[-1], flush=True)
    bs = max(a.batch_sizes)
    clips = np.random.default_rng(0).integers(0, 256, size=(2 * bs, 17, 64, 64, 3), dtype=np.uint8)
    os.environ.setdefault("NBP_PROGRESS", "0")
    rate = clips_per_second(lambda: fvd_features_of_clips(clips, batch_size=bs, device=device, weights=weights),
                            len(clips), device, a.repeats)
    rows.append(("fvd_features_of_clips, uint8 17x64x64 -> 16x224x224", "folded BN (default)", bs, rate))
    print(rows[-1], flush=True)

    cmd = "python benchmarks/i3d_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"Device: {device_label(device)}. Input 16x224x224, float32, best of {a.repeats} after a warm-up pass. "
             f"Command: `{cmd.strip()}`.", "", "| what | I3D | batch | clips/s | s/clip |", "|---|---|---|---|---|"]
    lines += [f"| {w} | {n} | {b} | {r:.2f} | {1 / r:.3f} |" for w, n, b, r in rows]
    body = "\n".join(lines) + "\n"
    print(body)
    title = f"I3D throughput for FVD ({device.type}, benchmarks/i3d_throughput.py)"
    write_markdown_section(Path(a.md), f"{KEY}_{device.type}", title, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
