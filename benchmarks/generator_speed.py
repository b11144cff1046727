"""Generator training throughput: tokens/s and model FLOPs utilisation, FlexAttention vs dense-mask SDPA.

One training step = forward, next-block loss, backward, gradient clipping, AdamW step (the same pieces as
``nbp train_generator``), on random token ids with the task's mask. Writes (replaces) this benchmark's
section of ``results/speed.md``, one section per device type.

    python benchmarks/generator_speed.py --device cuda --preset base              # H100: flex vs sdpa, bf16
    python benchmarks/generator_speed.py --device cpu --preset tiny --grid 5 8 8 --block 1 1 8 --vocab 1000 \
        --task class --modes sdpa --batch 32 --fp32

MFU = achieved model FLOP/s / the accelerator's dense bf16 peak; model FLOPs per token = 6 * N (N = weights
of all matmuls: blocks and head, not embeddings) + 12 * n_layer * n_embd * L (attention scores and values,
counted for full attention as in the PaLM appendix, though the block-causal mask needs about half).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nbp.generator.layout import BlockLayout, TaskLayout  # noqa: E402
from nbp.generator.model import GPT, gpt_config  # noqa: E402
from nbp.generator.train import next_block_loss, param_groups  # noqa: E402
from nbp.io import write_markdown_section

# dense bf16 peaks (TFLOP/s, without sparsity)
PEAK_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0,
               "A100": 312.0}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for k, v in PEAK_TFLOPS.items():
        if k in name:
            return v * 1e12
    return None


def flops_per_token(model: GPT, seq_len: int) -> float:
    c = model.config
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n.endswith("weight") and "emb" not in n)
    return 6 * matmul + 12 * c.n_layer * c.n_embd * seq_len


def make_task(a) -> TaskLayout:
    return TaskLayout(a.task, BlockLayout(tuple(a.grid), tuple(a.block)), video_vocab=a.vocab, num_classes=a.classes,
                      context_frames=a.context_frames)


def bench(a, mode: str, batch: int, device: torch.device) -> dict:
    """Time ``a.steps`` training steps after ``a.warmup`` (compilation included in the warm-up)."""
    task = make_task(a)
    torch.manual_seed(0)
    bf16 = device.type == "cuda" and not a.fp32
    model = GPT(gpt_config(a.preset, vocab_size=task.vocab_size, n_positions=task.seq_len, dropout=a.dropout,
                           cond_len=task.cond_len, flex_attention=mode == "flex")).to(device)
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda" or None)
    mask = task.block_mask(device=device) if mode == "flex" else task.dense_mask(device=device)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, a.vocab, (batch, task.num_tokens), generator=g).to(device)
    labels = torch.randint(0, max(a.classes, 1), (batch,), generator=g).to(device)
    inp, tgt = task.train_inputs(codes, task.cond_ids(labels))
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step():
        with amp:
            logits = model(inp, mask)
        loss, _ = next_block_loss(logits, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(a.warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / a.steps
    tokens = batch * task.seq_len
    fpt = flops_per_token(model, task.seq_len)
    peak = peak_flops(device)
    out = {"mode": mode, "preset": a.preset, "batch": batch, "seq_len": task.seq_len, "block": list(a.block),
           "precision": "bf16" if bf16 else "fp32", "step_s": round(dt, 4), "tokens_per_s": round(tokens / dt, 1),
           "tflops": round(fpt * tokens / dt / 1e12, 2), "mfu": round(fpt * tokens / dt / peak, 4) if peak else None,
           "warmup_s": round(warm_s, 1), "loss": round(loss.item(), 3), "params": model.num_params(),
           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    return out


def largest_batch(a, mode: str, device: torch.device) -> dict:
    """The first batch in ``a.batches`` (largest first) that fits, with its timing."""
    for b in a.batches:
        try:
            return bench(a, mode, b, device)
        except torch.OutOfMemoryError:
            pass
        torch.cuda.empty_cache()  # outside the except: the failed step's frames are released by now
        print(f"{mode}: batch {b} does not fit", flush=True)
    raise RuntimeError(f"{mode}: no batch in {a.batches} fits")


def check_agreement(a, device: torch.device) -> float:
    """Max |flex - sdpa| of the logits (bf16 on CUDA) on a 2-sample batch: both paths must compute the same thing."""
    task = make_task(a)
    torch.manual_seed(0)
    model = GPT(gpt_config(a.preset, vocab_size=task.vocab_size, n_positions=task.seq_len, cond_len=task.cond_len)).to(device)
    codes = torch.randint(0, a.vocab, (2, task.num_tokens), device=device)
    inp, _ = task.train_inputs(codes, task.cond_ids(torch.zeros(2, dtype=torch.long, device=device)))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        d = model(inp, task.dense_mask(device=device)).float()
        f = model(inp, task.block_mask(device=device)).float()
    diff = (d - f).abs().max().item() / d.abs().max().item()
    del model
    return diff


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    load = os.getloadavg()[0]
    return (f"CPU, {torch.get_num_threads()} threads ({os.cpu_count()} cores visible, load average {load:.1f}), "
            f"torch {torch.__version__}")


def markdown(rows: list[dict], device: torch.device, cmd: str, extra: str = "") -> str:
    lines = [f"Device: {device_label(device)}. Command: `{cmd}`.", "",
             "| attention | preset | batch | tokens/seq | precision | step (s) | tokens/s | TFLOP/s | MFU | peak mem (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(f"| {r['mode']} | {r['preset']} | {r['batch']} | {r['seq_len']} | {r['precision']} | {r['step_s']} | "
                     f"{r['tokens_per_s']:,.0f} | {r['tflops']} | {mfu} | {r.get('peak_mem_gib', '-')} |")
    return "\n".join(lines) + ("\n\n" + extra if extra else "") + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="base")
    p.add_argument("--task", default="uncond", choices=["uncond", "class", "frame_pred", "hybrid"])
    p.add_argument("--grid", type=int, nargs=3, default=[5, 16, 16])
    p.add_argument("--block", type=int, nargs=3, default=[1, 1, 16])
    p.add_argument("--vocab", type=int, default=64000)
    p.add_argument("--classes", type=int, default=0)
    p.add_argument("--context-frames", type=int, default=0)
    p.add_argument("--modes", nargs="+", default=["flex", "sdpa"], choices=["flex", "sdpa"])
    p.add_argument("--batch", type=int, nargs="+", dest="batches", default=[48, 40, 32, 24, 16, 8, 4])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--md", default="results/speed.md")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args(argv)
    if a.task == "class" and a.classes == 0:
        a.classes = 8
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rows, extra = [], ""
    if "flex" in a.modes and device.type == "cuda":
        extra = f"FlexAttention vs dense SDPA logits (bf16, 2 samples): max relative difference {check_agreement(a, device):.2e}."
    for mode in a.modes:
        if mode == "flex" and device.type != "cuda":
            print("flex: skipped on CPU (no fused kernel without CUDA; eager flex has no backward on CPU)")
            continue
        r = largest_batch(a, mode, device)
        print(json.dumps(r), flush=True)
        rows.append(r)
    cmd = "python benchmarks/generator_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    title = f"Generator training throughput ({'GPU' if device.type == 'cuda' else 'CPU'})"
    write_markdown_section(Path(a.md), f"generator_speed_{device.type}", title, markdown(rows, device, cmd.strip(), extra))
    if a.json:
        Path(a.json).write_text(json.dumps({"device": device_label(device), "rows": rows, "note": extra}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
