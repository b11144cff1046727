"""Generation speed at the paper's protocol on one GPU: K600 frame prediction (5 frames given, 12 predicted),
``base`` (700M) generator in bf16 with fused QKV, NBP (1x1x16, 48 steps) vs NTP (1x1x1, 768 steps) with the
same weights, eager decode steps vs the fixed-shape step captured in a CUDA graph.

Per batch size: seconds per video and frames/s with the tokenizer's encode (the 5 context frames) and
decode (all 17 frames) included as the paper's Table 1 counts them (frames = the 12 predicted ones), the
NBP/NTP ratio, one decode step against the memory-bound limit (bytes the step must read: block and head
weights, plus the keys/values at that prefix, over the HBM bandwidth), peak memory, and greedy equality of
the graph path with the eager path. Writes the ``gpu_decode_<device>`` section of ``results/speed.md``.

    python benchmarks/gpu_decode.py                          # on a GPU: base, batch 1 and 16
    python benchmarks/gpu_decode.py --tiny --device cpu      # smoke run (the graph path runs as 'static')
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from nbp.generator import sampling as S
from nbp.generator.layout import BlockLayout, TaskLayout
from nbp.generator.model import GPT, KVCache, gpt_config
from nbp.io import write_markdown_section
from nbp.tokenizer.model import VideoTokenizer, preset

KEY = "gpu_decode"
HBM_GBPS = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0,
            "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100-SXM4-40GB": 1555.0}
SAMPLED = dict(top_k=16000, top_p=0.9)  # the released evaluation filter


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> tuple[float, object]:
    """Median seconds of fn() over repeats (after one warm-up), and the last result."""
    out = fn()
    ts = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def bandwidth(device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "given"
    if device.type != "cuda":
        return None, "-"
    name = torch.cuda.get_device_name(device)
    for key, gbps in HBM_GBPS.items():
        if key in name:
            return gbps, f"{key} spec"
    return None, "unknown"


def step_bytes(model: GPT, batch: int, prefix: int) -> tuple[int, int]:
    """Bytes one decode step reads: weights of the blocks, final norm and head (the embedding is gathered),
    and the cached keys/values up to ``prefix``."""
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if not n.startswith(("tok_emb", "pos_emb", "uncond_embedding")))
    c = model.config
    kv = 2 * c.n_layer * batch * prefix * c.n_embd * next(model.parameters()).element_size()
    return weights, kv


def decode_step_time(model, batch, prefix, block, device, mode, repeats) -> float:
    """Seconds of one decode step of ``block`` tokens at ``prefix`` (eager sliced step, or the StaticDecoder)."""
    task = TaskLayout("frame_pred", BlockLayout((5, 16, 16), (1, 1, block)), model.config.vocab_size, context_frames=2)
    ids = torch.randint(0, model.config.vocab_size, (batch, prefix + block), device=device)
    cache = KVCache.for_model(model, batch, max_len=prefix + block)
    with torch.no_grad():
        S.prefill(model, task, ids[:, :prefix], cache, last=1)
        if mode == "eager":
            fn = lambda: S.decode_step(model, task, ids[:, prefix:], cache, prefix)  # noqa: E731
        else:
            dec = S.StaticDecoder(model, cache, mode)
            fn = lambda: dec(ids[:, prefix:], prefix)  # noqa: E731
        fn()
        return timed(fn, device, repeats)[0]


def run(a) -> tuple[list[dict], dict]:
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    graph = "graph" if cuda else "static"
    dtype = torch.bfloat16 if cuda and not a.fp32 else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(gpt_config(a.preset, vocab_size=a.vocab, n_positions=5120))
    model.prepare_inference(dtype=dtype)
    tok = VideoTokenizer(preset(a.tokenizer)).to(device).eval()
    tf = tok.config.temporal_factor
    T, H, W = 1 + (a.frames - 1) // tf, a.size // a.spatial, a.size // a.spatial
    tasks = {name: TaskLayout("frame_pred", BlockLayout((T, H, W), block), model.config.vocab_size, context_frames=2)
             for name, block in (("NBP", (1, 1, W)), ("NTP", (1, 1, 1)))}
    ctx_frames = 1 + tf * (2 - 1)  # 2 latent frames = 5 pixel frames
    pred_frames = a.frames - ctx_frames
    rows, info = [], {"dtype": str(dtype).replace("torch.", ""), "params_M": model.num_params(False) / 1e6,
                      "tokenizer_M": sum(p.numel() for p in tok.parameters()) / 1e6, "grid": (T, H, W)}
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and not a.fp32 else torch.autocast("cpu", enabled=False)
    for b in a.batches:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        clip = torch.rand(b, 3, a.frames, a.size, a.size, device=device)
        with torch.inference_mode(), amp:
            t_enc, ctx = timed(functools.partial(tok.encode_codes, clip[:, :, :ctx_frames]), device, a.repeats)  # [b, 2, H, W]
        for name, task in tasks.items():
            prompt = S.prompt_ids(task, context=ctx.long())
            for dec in ("eager", graph):
                if name == "NTP" and b > 1 and dec == "eager" and a.skip_ntp_eager_batch:
                    continue
                gen = functools.partial(S.generate, model, task, prompt, decoder=dec, **SAMPLED,
                                        generator=torch.Generator(device=device).manual_seed(0))
                t_gen, out = timed(gen, device, a.repeats if name == "NBP" else 1)
                codes = S.codes_of(task, out)  # [b, T, H, W]
                with torch.inference_mode(), amp:
                    t_dec, _ = timed(functools.partial(tok.decode_codes, codes), device, a.repeats)
                busy = t_enc + t_gen + t_dec
                rows.append({"batch": b, "mode": name, "decoder": dec, "steps": S.count_steps(task), "encode_s": t_enc,
                             "generate_s": t_gen, "decode_s": t_dec, "s_per_video": busy / b,
                             "fps": b * pred_frames / busy, "generate_fps": b * pred_frames / t_gen,
                             "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None})
                print(rows[-1], flush=True)
    # greedy equality: graph (or static) path vs the eager path, NBP and NTP, batch 1
    info["greedy_equal"] = {}
    for name, task in tasks.items():
        prompt = S.prompt_ids(task, context=ctx[:1].long())
        eager = S.generate(model, task, prompt, greedy=True)
        fixed = S.generate(model, task, prompt, greedy=True, decoder=graph)
        same = (eager == fixed).float().mean().item()
        info["greedy_equal"][name] = (bool(torch.equal(eager, fixed)), same)
        if cuda:
            info["greedy_equal"][name + " (graph vs static eager)"] = (
                bool(torch.equal(fixed, S.generate(model, task, prompt, greedy=True, decoder="static"))), None)
    # one decode step against the memory-bound limit
    gbps, src = bandwidth(device, a.hbm_gbps)
    info["bandwidth"] = (gbps, src)
    info["steps"] = []
    for b in a.batches:
        for dec in ("eager", graph):
            sec = decode_step_time(model, b, a.prefix, W, device, dec, a.repeats * 10)
            wb, kvb = step_bytes(model, b, a.prefix)
            limit = (wb + kvb) / (gbps * 1e9) if gbps else None
            info["steps"].append({"batch": b, "decoder": dec, "ms": 1e3 * sec, "weights_MB": wb / 1e6, "kv_MB": kvb / 1e6,
                                  "limit_ms": 1e3 * limit if limit else None, "fraction": limit / sec if limit else None})
            print(info["steps"][-1], flush=True)
    return rows, info


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return (f"CPU, {torch.get_num_threads()} threads ({os.cpu_count()} cores visible), torch {torch.__version__}, "
            f"load average {os.getloadavg()[0]:.2f}")


def markdown(rows, info, a, cmd) -> str:
    device = torch.device(a.device)
    T, H, W = info["grid"]
    lines = [f"Device: {device_label(device)}. Generator `{a.preset}` ({info['params_M']:.0f}M parameters without "
             f"embeddings, {info['dtype']}, fused QKV, random weights), vocabulary {a.vocab:,}; tokenizer `{a.tokenizer}` "
             f"({info['tokenizer_M']:.0f}M, bf16 autocast on CUDA) at {a.frames}x{a.size}x{a.size} -> {T}x{H}x{W}. "
             f"K600 protocol: 5 frames encoded, {T * H * W - 2 * H * W} tokens generated with top-k 16000 / top-p 0.9, "
             f"{a.frames} frames decoded; "
             f"frames/s counts the {a.frames - 5} predicted frames over encode + generate + decode (the paper's Table 1: "
             f"NBP 700M 8.89, NTP 0.80 on an A100). Median of {a.repeats} runs after a warm-up (NTP: one run). "
             f"Command: `{cmd}`.", "",
             "| batch | mode | decoder | steps | encode s | generate s | decode s | s / video | frames/s "
             "| generate-only frames/s | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {r['batch']} | {r['mode']} | {r['decoder']} | {r['steps']} | {r['encode_s']:.3f} "
                     f"| {r['generate_s']:.3f} | {r['decode_s']:.3f} | {r['s_per_video']:.3f} | {r['fps']:.2f} "
                     f"| {r['generate_fps']:.2f} | {peak} |")
    by = {(r["batch"], r["mode"], r["decoder"]): r for r in rows}
    ratios = []
    for (b, mode, dec), r in by.items():
        if mode == "NBP" and (b, "NTP", dec) in by:
            ntp = by[(b, "NTP", dec)]
            ratios.append(f"batch {b}, {dec}: {ntp['generate_s'] / r['generate_s']:.1f}x generation, "
                          f"{r['fps'] / ntp['fps']:.1f}x frames/s")
    lines += ["", "NBP over NTP, same weights: " + "; ".join(ratios) + ".",
              "Greedy output of the fixed-shape path vs the eager path: " + "; ".join(
                  f"{k}: {'identical' if eq else f'differs ({frac:.1%} of ids equal)' if frac is not None else 'differs'}"
                  for k, (eq, frac) in info["greedy_equal"].items()) + ".", ""]
    gbps, src = info["bandwidth"]
    lines += [f"One NBP decode step ({W} tokens) at prefix {a.prefix}; memory-bound limit = (weights + keys/values read) / "
              f"HBM bandwidth ({f'{gbps:,.0f} GB/s, {src}' if gbps else 'unknown on this device'}).", "",
              "| batch | decoder | step ms | weights MB | keys/values MB | limit ms | fraction of the limit |",
              "|---|---|---|---|---|---|---|"]
    for s in info["steps"]:
        lim = f"{s['limit_ms']:.3f}" if s["limit_ms"] else "-"
        frac = f"{s['fraction']:.0%}" if s["fraction"] else "-"
        lines.append(f"| {s['batch']} | {s['decoder']} | {s['ms']:.3f} | {s['weights_MB']:,.0f} | {s['kv_MB']:,.0f} "
                     f"| {lim} | {frac} |")
    return "\n".join(lines) + "\n"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="base")
    p.add_argument("--tokenizer", default="base")
    p.add_argument("--vocab", type=int, default=64000)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--spatial", type=int, default=8, help="tokenizer spatial factor")
    p.add_argument("--batch", type=int, nargs="+", dest="batches", default=[1, 16])
    p.add_argument("--prefix", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fp32", action="store_true")
    p.add_argument("--hbm-gbps", type=float, default=None, help="HBM bandwidth in GB/s (default: from the GPU name)")
    p.add_argument("--skip-ntp-eager-batch", action="store_true", help="no eager NTP above batch 1 (time budget)")
    p.add_argument("--tiny", action="store_true", help="smoke size: tiny generator, small tokenizer at 17x32x32")
    p.add_argument("--md", default="results/speed.md", help="'' to write nothing")
    a = p.parse_args(argv)
    if a.tiny:
        a.preset, a.tokenizer, a.vocab, a.size, a.spatial, a.prefix, a.repeats = "tiny", "small", 1000, 32, 4, 64, 1
    return a


def main(argv=None) -> int:
    a = parse(argv)
    rows, info = run(a)
    cmd = "python benchmarks/gpu_decode.py " + " ".join(sys.argv[1:] if argv is None else argv)
    body = markdown(rows, info, a, cmd.strip())
    print(body)
    if a.md:
        dev = torch.device(a.device).type
        write_markdown_section(Path(a.md), f"{KEY}_{dev}", f"Generation speed, K600 protocol, NBP vs NTP ({dev})", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
