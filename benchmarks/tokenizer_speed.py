"""Tokenizer encode / decode throughput (clips/s) in inference mode.

Writes the ``tokenizer_speed_<device>`` section of ``results/speed.md``. Default: the ``base`` preset (the
released architecture, random weights: speed does not depend on them) at 17x128x128, batch 1, on the CPU, and
the ``small`` preset (embedded experiment) at 17x32x32. ``python benchmarks/tokenizer_speed.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nbp.io import write_markdown_section
from nbp.tokenizer.model import VideoTokenizer, preset  # noqa: E402


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best


def measure(name: str, frames: int, size: int, batch: int, device: torch.device, warmup: int, repeats: int,
            bf16: bool = False) -> dict:
    torch.manual_seed(0)
    model = VideoTokenizer(preset(name)).to(device).eval()
    x = torch.rand(batch, 3, frames, size, size, device=device)
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else torch.no_grad
    with torch.inference_mode(), ctx():
        codes = model.encode_codes(x)
        enc = timed(lambda: model.encode_codes(x), device, warmup, repeats)
        dec = timed(lambda: model.decode_codes(codes), device, warmup, repeats)
    return {"preset": name, "input": f"{frames}x{size}x{size}", "batch": batch, "latent": "x".join(map(str, codes.shape[1:])),
            "params (M)": f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}",
            "precision": "bf16 autocast" if bf16 else "fp32",
            "encode s": f"{enc:.3f}", "encode clips/s": f"{batch / enc:.3f}",
            "decode s": f"{dec:.3f}", "decode clips/s": f"{batch / dec:.3f}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--base-batch", type=int, default=1)
    p.add_argument("--small-batch", type=int, default=8)
    p.add_argument("--skip-base", action="store_true", help="only the small preset (quick)")
    p.add_argument("--md", default=str(Path(__file__).resolve().parents[1] / "results" / "speed.md"))
    a = p.parse_args(argv)
    device = torch.device(a.device)
    rows = []
    if not a.skip_base:
        rows.append(measure("base", 17, 128, a.base_batch, device, a.warmup, a.repeats))
        if device.type == "cuda":
            rows.append(measure("base", 17, 128, a.base_batch, device, a.warmup, a.repeats, bf16=True))
    rows.append(measure("small", 17, 32, a.small_batch, device, a.warmup, a.repeats))
    for r in rows:
        print(r)
    cols = list(rows[0])
    table = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    table += "".join("| " + " | ".join(str(r[c]) for c in cols) + " |\n" for r in rows)
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    else:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        where = (f"CPU ({platform.machine()}, {os.cpu_count()} cores visible), {torch.get_num_threads()} threads, "
                 f"torch {torch.__version__}, load average {load:.1f} at the end (other work on the machine inflates times)")
    cmd = "python benchmarks/tokenizer_speed.py" + (f" --device {a.device}" if a.device != "cpu" else "")
    body = (f"Device: {where}. Inference mode, random weights, best of {a.repeats} after {a.warmup} warm-up run(s); "
            f"encode = video -> FSQ indices, decode = indices -> video in [0, 1]. Command: `{cmd}`.\n\n{table}")
    title = f"Tokenizer encode / decode throughput ({device.type})"
    write_markdown_section(Path(a.md), f"tokenizer_speed_{device.type}", title, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
