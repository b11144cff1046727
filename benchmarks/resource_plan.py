"""Resource plan from measurements (issue 14, item 5): every paper stage at its real sizes, a few steps on one GPU,
then GPU-hours and disk per paper suite and suggested Slurm resources per rule.

Parts (peak memory is ``torch.cuda.max_memory_allocated``, reset before each part):

- ``train_tokenizer``: the ``base`` tokenizer at 17x128x128 built by ``TokenizerTraining`` from the params.yaml
  ``train_tokenizer.k600`` entry (LPIPS with random VGG16 weights, PatchGAN 3D, EMA 0.999, bf16 autocast on CUDA),
  one ``train_step`` with the discriminator on; the per-GPU micro batch starts at the recipe's share
  (``batch_size`` / the rule's GPUs) and halves on out-of-memory;
- ``tokenizer codec``: encode and decode clips/s in bf16 (``benchmarks/tokenizer_speed.py``'s ``measure``);
- ``train_generator``: ``base``, ``xl`` and ``3b`` training steps at the K600 sequence (``benchmarks/generator_speed.py``'s
  ``bench``: bf16, FlexAttention), plain AdamW on one GPU, batch from the recipe's per-GPU share, halved on OOM;
- ``sampling``: one ``eval_generator`` batch of ``base`` (``nbp.generator.sampling.generate``, top-k 16000 / top-p
  0.9, CUDA-graph decode steps) at the K600 (NBP and NTP) and UCF protocols;
- ``i3d``: the FVD detector's clips/s at 16x224x224 (random weights, BatchNorm folded as ``load_i3d`` does).

The plan: GPU-hours = work / measured rate per GPU for each stage of each suite (nbp/suites.py), the disk of the clip
cache (uint8 clips) and the token shards (``nbp.generator.data.token_dtype``), and ``set-resources`` for
``workflow/profiles/slurm/config.yaml`` (printed, not written). Writes the ``resource_plan_<device>`` section of
``results/speed.md``.

    python benchmarks/resource_plan.py --device cuda            # on one H100/H200 (part of benchmarks/gpu.sh)
    python benchmarks/resource_plan.py --tiny --md /tmp/s.md    # CPU smoke run: small presets and sizes, 1 step
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import generator_speed  # noqa: E402
import i3d_throughput  # noqa: E402
import numpy as np  # noqa: E402
import tokenizer_speed  # noqa: E402
import torch  # noqa: E402

from nbp import dag  # noqa: E402
from nbp.config import load_config  # noqa: E402
from nbp.distributed import DistInfo  # noqa: E402
from nbp.generator import sampling as S  # noqa: E402
from nbp.generator.data import token_dtype  # noqa: E402
from nbp.generator.layout import BlockLayout, TaskLayout, ucf101_text_ids  # noqa: E402
from nbp.generator.model import GPT, gpt_config  # noqa: E402
from nbp.io import write_markdown_section  # noqa: E402
from nbp.metrics.i3d import I3D  # noqa: E402
from nbp.metrics.image import _VGG_CONVS  # noqa: E402
from nbp.suites import SUITES  # noqa: E402
from nbp.tokenizer.train import TokenizerTraining  # noqa: E402

KEY = "resource_plan"
PAPER_SUITES = ("ucf101", "k600", "k600_ablations")
SAMPLED = dict(top_k=16000, top_p=0.9)
# videos per split (UCF-101 split 1 as in NBP.md; Kinetics-600 as its paper lists them, the downloadable share is smaller)
VIDEOS = {"ucf101": {"train": 9537, "test": 3783}, "k600": {"train": 392000, "val": 30000}}
MARGIN = 1.5  # Slurm runtime = measured estimate x this (data loading, checkpoints, evaluation not timed here)


# --------------------------------------------------------------------------------------
# measurements


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def median_time(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median synchronised seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def halving(start: int, what: str, fn, device: torch.device) -> dict:
    """``fn(batch)`` at ``start``, halving the batch on CUDA out-of-memory; the row notes the batches that failed."""
    failed, b = [], start
    while b >= 1:
        try:
            row = fn(b)
            row["oom"] = failed
            return row
        except torch.OutOfMemoryError:
            pass
        torch.cuda.empty_cache()  # outside the except: the failed step's frames are gone by now
        print(f"{what}: batch {b} does not fit", flush=True)
        failed.append(b)
        b //= 2
    return {"batch": None, "oom": failed}


def random_lpips_files(folder: Path) -> None:
    """Random VGG16 trunk + LPIPS heads in the files ``load_lpips`` reads (timing does not depend on the weights)."""
    g = torch.Generator().manual_seed(0)
    vgg = {}
    for i, cin, cout in _VGG_CONVS:
        vgg[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        vgg[f"features.{i}.bias"] = torch.zeros(cout)
    lin = {f"lin{j}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for j, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, folder / "vgg.pth")
    torch.save(lin, folder / "lin.pth")
    os.environ["NBP_LPIPS_VGG"], os.environ["NBP_LPIPS_LIN"] = str(folder / "vgg.pth"), str(folder / "lin.pth")


def tokenizer_config(a, micro: int, out: str):
    over = {"run.out": out, "run.device": a.device, "run.wandb.mode": "disabled",
            f"train_tokenizer.{a.tok_entry}.batch_size": micro, f"train_tokenizer.{a.tok_entry}.disc_start": 0}
    if a.tiny:
        over.update({f"train_tokenizer.{a.tok_entry}.preset": "small", f"train_tokenizer.{a.tok_entry}.channels": 8,
                     f"train_tokenizer.{a.tok_entry}.disc_channels": 8, f"train_tokenizer.{a.tok_entry}.disc_layers": 2})
    return load_config(a.params, over)


def tokenizer_step(a, device: torch.device, micro: int) -> dict:
    """Median seconds of ``TokenizerTraining.train_step`` (GAN on, LPIPS, EMA) at micro-batch ``micro`` on one device."""
    reset_peak(device)
    with tempfile.TemporaryDirectory() as out:
        cfg = tokenizer_config(a, micro, out)
        frames = np.random.default_rng(0).integers(0, 256, (micro, a.frames, a.size, a.size, 3), dtype=np.uint8)
        paths = dag.resolve(cfg, "train_tokenizer", a.tok_entry)
        tr = TokenizerTraining(cfg, a.tok_entry, frames, device, DistInfo(), paths)
        step = [0]

        def one():
            tr.train_step(step[0])
            step[0] += 1

        sec = median_time(one, device, a.warmup, a.steps)
        params = sum(p.numel() for p in tr.model.parameters())
    return {"part": "train_tokenizer", "what": f"{tr.t.preset}, {a.frames}x{a.size}x{a.size}, LPIPS + {tr.t.disc} "
            f"+ EMA {tr.t.ema}", "batch": micro, "step_s": sec, "samples_s": micro / sec, "peak_gib": peak_gib(device),
            "params_M": params / 1e6}


def tokenizer_codec(a, device: torch.device) -> dict:
    reset_peak(device)
    r = tokenizer_speed.measure(a.tok_preset, a.frames, a.size, a.codec_batch, device, a.warmup, a.steps,
                                bf16=device.type == "cuda")
    return {"part": "tokenizer codec", "what": f"{r['preset']}, {r['input']} -> {r['latent']}, {r['precision']}",
            "batch": a.codec_batch, "encode_s": float(r["encode s"]), "decode_s": float(r["decode s"]),
            "encode_cps": float(r["encode clips/s"]), "decode_cps": float(r["decode clips/s"]), "peak_gib": peak_gib(device)}


def generator_args(a, preset: str) -> SimpleNamespace:
    return SimpleNamespace(task="frame_pred", grid=list(a.grid), block=list(a.block), vocab=a.vocab, classes=0,
                           context_frames=a.context, preset=preset, dropout=0.0, fp32=a.device == "cpu",
                           warmup=a.warmup, steps=a.steps)


def generator_step(a, device: torch.device, name: str, preset: str, batch: int) -> dict:
    reset_peak(device)
    r = generator_speed.bench(generator_args(a, preset), a.attention, batch, device)
    return {"part": "train_generator", "preset": name, "what": f"{preset}, {r['seq_len']} tokens, {r['precision']}, "
            f"{a.attention}, AdamW", "batch": batch, "step_s": r["step_s"], "samples_s": batch / r["step_s"],
            "peak_gib": r.get("peak_mem_gib"), "params": r["params"], "mfu": r["mfu"], "seq_len": r["seq_len"]}


def reused_row(a, name: str) -> dict | None:
    """The row of preset ``name`` from ``benchmarks/generator_speed.py --json`` (same step, same sequence, its
    attention mode and batch) instead of measuring it again; None when not given or not there."""
    if not a.reuse_json or not Path(a.reuse_json).is_file():
        return None
    import json

    try:
        data = json.loads(Path(a.reuse_json).read_text())
    except ValueError:  # empty or cut short (generator_speed.py failed or timed out): measure here
        return None
    for r in data.get("rows", []) if isinstance(data, dict) else []:
        if r.get("preset") == name and r.get("mode") == a.attention:
            return {"part": "train_generator", "preset": name, "what": f"{name}, {r['seq_len']} tokens, {r['precision']}, "
                    f"{r['mode']}, AdamW (generator_speed.py's row)", "batch": r["batch"], "step_s": r["step_s"],
                    "samples_s": r["batch"] / r["step_s"], "peak_gib": r.get("peak_mem_gib"), "params": r["params"],
                    "mfu": r["mfu"], "seq_len": r["seq_len"], "oom": []}
    return None


def sampling_tasks(a) -> dict[str, TaskLayout]:
    grid, W = tuple(a.grid), a.grid[2]
    text = tuple(tuple(v) for v in ucf101_text_ids().values())
    return {"K600 NBP": TaskLayout("frame_pred", BlockLayout(grid, (1, 1, W)), a.vocab, context_frames=a.context),
            "K600 NTP": TaskLayout("frame_pred", BlockLayout(grid, (1, 1, 1)), a.vocab, context_frames=a.context),
            "UCF NBP": TaskLayout("hybrid", BlockLayout(grid, (1, 1, W)), a.vocab, text_ids=text)}


def sampling(a, device: torch.device) -> list[dict]:
    """Seconds per ``eval_generator`` batch of ``base`` (sampled filter; graph decode steps on CUDA)."""
    reset_peak(device)
    tasks = sampling_tasks(a)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(gpt_config(a.gen_presets[0], vocab_size=max(t.vocab_size for t in tasks.values())))
    model.prepare_inference(dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    decoder = "graph" if device.type == "cuda" else "static"
    b, rows = a.sample_batch, []
    g = torch.Generator().manual_seed(0)
    for name, task in tasks.items():
        if task.task == "frame_pred":
            ctx = torch.randint(0, a.vocab, (b, a.context, *a.grid[1:]), generator=g).to(device)
            prompt = S.prompt_ids(task, context=ctx)
        else:
            prompt = S.prompt_ids(task, labels=torch.randint(0, len(task.text_ids), (b,), generator=g).to(device))

        def gen(task=task, prompt=prompt):
            S.generate(model, task, prompt, decoder=decoder, **SAMPLED, generator=torch.Generator(device=device).manual_seed(0))

        sec = median_time(gen, device, 1, 1 if "NTP" in name else a.steps)
        steps = S.count_steps(task)
        rows.append({"part": "sampling", "what": f"{a.gen_presets[0]}, {name}, {steps} steps, {decoder}",
                     "protocol": name, "block": task.layout.block, "steps": steps, "batch": b, "batch_s": sec,
                     "video_s": sec / b, "peak_gib": peak_gib(device)})
        print(rows[-1], flush=True)
    return rows


def i3d_rate(a, device: torch.device) -> dict:
    """FVD detector clips/s at [B, 3, T, 224, 224] (random weights; ``load_i3d``'s folded BatchNorm, channels-last)."""
    reset_peak(device)
    torch.manual_seed(0)
    model = I3D().fuse_bn().eval().requires_grad_(False).to(device).to(memory_format=torch.channels_last_3d)
    x = torch.rand(a.i3d_batch, 3, a.i3d_frames, 224, 224, device=device) * 2 - 1

    def run():
        with torch.inference_mode():
            model(x)

    cps = i3d_throughput.clips_per_second(run, a.i3d_batch, device, a.steps)
    return {"part": "i3d", "what": f"{a.i3d_frames}x224x224, fp32", "batch": a.i3d_batch, "cps": cps,
            "peak_gib": peak_gib(device)}


def zero2_gib(params: int, gpus: int) -> dict[str, float]:
    """Model state per GPU for mixed-precision AdamW: fp32 weights (4 B), gradients (4 B), Adam moments (8 B);
    ZeRO-2 shards gradients and moments over ``gpus`` (weights replicated)."""
    g = 2**30
    return {"adamw": 16 * params / g, "zero2": (4 * params + 12 * params / gpus) / g}


def measure(a, device: torch.device, report=lambda m: None) -> dict:
    """Every part; the generator steps (compiled FlexAttention, the longest) last, each skipped once ``a.budget``
    seconds have passed. ``report(m)`` runs before each generator part and at the end (the section is written
    then, with the parts not yet measured marked, so a run killed by its time limit still leaves one)."""
    t0 = time.perf_counter()
    with torch.device("meta"):  # the paper presets at the K600 vocabulary
        models = {n: GPT(gpt_config(n, vocab_size=64000)) for n in ("base", "xl", "3b")}
    m = {"params": {n: g.num_params() for n, g in models.items()},
         "params_ne": {n: g.num_params(False) for n, g in models.items()}}
    m["tokenizer"] = halving(a.tok_batch, "train_tokenizer", lambda b: tokenizer_step(a, device, b), device)
    print(m["tokenizer"], flush=True)
    m["codec"] = tokenizer_codec(a, device)
    print(m["codec"], flush=True)
    m["sampling"] = {r["protocol"]: r for r in sampling(a, device)}
    m["i3d"] = i3d_rate(a, device)
    print(m["i3d"], flush=True)
    m["generators"] = {n: {"preset": n, "batch": None, "oom": [], "skipped": True} for n in ("base", "xl", "3b")}
    for name, preset in zip(("base", "3b", "xl"), a.gen_presets):  # 3B before xl: whether it fits matters most
        report(m)
        reused = reused_row(a, name)
        if reused is not None:
            m["generators"][name] = reused
        elif a.budget and time.perf_counter() - t0 > a.budget:
            print(f"train_generator {name}: skipped (past the {a.budget} s budget)", flush=True)
        else:
            m["generators"][name] = halving(a.gen_batch, f"train_generator {name}", lambda b, name=name, preset=preset:
                                            generator_step(a, device, name, preset, b), device)
        print(m["generators"][name], flush=True)
    report(m)
    return m


# --------------------------------------------------------------------------------------
# the plan


def clip_counts(cfg, ds: str, per_video: int) -> tuple[int, int]:
    """(training clips, evaluation clips) of a paper dataset: videos per split x clips per training video."""
    splits = VIDEOS[cfg.prepare[ds].dataset]
    eval_videos = sum(n for s, n in splits.items() if s != "train")
    return splits["train"] * per_video, eval_videos


def gen_task(cfg, g: str) -> TaskLayout:
    e = cfg.train_generator[g]
    return TaskLayout(e.task, BlockLayout(LATENT, tuple(e.block)), 64000, context_frames=e.context_frames)


LATENT = (5, 16, 16)  # the base tokenizer's grid of a 17x128x128 clip


def generator_rate(m: dict, cfg, g: str) -> tuple[float | None, str]:
    """Samples/s per GPU of generator entry ``g``: its preset's measured rate at the K600 sequence, scaled by
    tokens per sample where its sequence differs (UCF's hybrid layout: text + the first block)."""
    e = cfg.train_generator[g]
    r = m["generators"][e.preset]
    if r.get("batch") is None:
        return None, "not measured (time budget or limit)" if r.get("skipped") else "did not fit"
    seq = gen_task(cfg, g).seq_len
    note = "measured" if seq == r["seq_len"] else f"measured at {r['seq_len']} tokens, x {r['seq_len']}/{seq}"
    return r["samples_s"] * r["seq_len"] / seq, note


def sample_seconds(m: dict, cfg, g: str) -> tuple[float, str]:
    """Seconds per generated video of entry ``g``: base measured per decode step (NBP or NTP rate), scaled by the
    entry's decode steps and, for xl / 3b, by the weights each step reads (non-embedding parameters)."""
    e = cfg.train_generator[g]
    task = gen_task(cfg, g)
    ref = m["sampling"]["UCF NBP" if e.task == "hybrid" else ("K600 NTP" if task.block_size == 1 else "K600 NBP")]
    ref_steps = ref["steps"]
    per_step = ref["video_s"] / ref_steps
    size = m["params_ne"][e.preset] / m["params_ne"]["base"]
    steps = S.count_steps(task)
    note = ("measured" if tuple(e.block) == ref["block"] and e.preset == "base"
            else f"{ref['protocol']} per step x {steps} steps" + (f" x {size:.2f} (weights)" if e.preset != "base" else ""))
    return per_step * steps * size, note


def plan_rows(cfg, m: dict, suite: str) -> list[dict]:
    lists = SUITES[suite][1]
    tok, codec, i3d = m["tokenizer"], m["codec"], m["i3d"]
    per_video_s = 1 / codec["decode_cps"] + 1 / i3d["cps"]  # each generated video: decode + I3D features
    rows = []

    def add(stage, entry, work, gpu_s, note="measured", disk_gb=0.0):
        gpus = dag.PAPER[stage]["gpu"]
        gh = gpu_s / 3600 if gpu_s is not None else None
        rows.append({"suite": suite, "stage": stage, "entry": entry, "work": work, "gpu_h": gh, "gpus": gpus,
                     "wall_h": gh / max(gpus, 1) if gh is not None else None, "disk_gb": disk_gb, "note": note})

    for ds in lists["datasets"]:
        p = cfg.prepare[ds]
        train, ev = clip_counts(cfg, ds, p.train_clips_per_video)
        add("prepare", ds, f"{train + ev:,} clips", 0.0, "CPU only", (train + ev) * p.frames * p.resolution**2 * 3 / 1e9)
        rs = cfg.real_stats[ds]
        add("real_stats", ds, f"{rs.num_videos:,} videos", rs.num_videos / i3d["cps"])
    for t in lists["tokenizers"]:
        tt = cfg.train_tokenizer[t]
        tok_s = tt.steps * tt.batch_size / tok["samples_s"] if tok.get("batch") else None
        add("train_tokenizer", t, f"{tt.steps:,} steps x {tt.batch_size}", tok_s,
            f"micro-batch {tok['batch']}" if tok.get("batch") else "did not fit")
        n = cfg.eval_tokenizer[t].num_videos
        add("eval_tokenizer", t, f"{n:,} videos", n * (1 / codec["encode_cps"] + 1 / codec["decode_cps"]))
        train, ev = clip_counts(cfg, tt.dataset, cfg.tokenize[t].train_clips_per_video)
        shard = (train + ev) * math.prod(LATENT) * token_dtype(64000).itemsize / 1e9
        add("tokenize", t, f"{train + ev:,} clips", (train + ev) / codec["encode_cps"], disk_gb=shard)
    for g in lists["generators"]:
        e = cfg.train_generator[g]
        rate, note = generator_rate(m, cfg, g)
        add("train_generator", g, f"{e.preset}, {e.steps:,} steps x {e.batch_size}",
            e.steps * e.batch_size / rate if rate else None, note)
        ev = cfg.eval_generator[g]
        sec, note = sample_seconds(m, cfg, g)
        n = ev.num_videos * len(ev.seeds)
        enc = 1 / codec["encode_cps"] if e.task == "frame_pred" else 0.0  # the context clip (17 frames: an upper bound)
        add("eval_generator", g, f"{ev.num_videos:,} videos x {len(ev.seeds)} seeds", n * (sec + enc + per_video_s), note)
    return rows


def slurm_resources(rows: list[dict], m: dict) -> str:
    """``set-resources`` for the Slurm profile: per rule the longest entry's wall time x MARGIN, the rule's GPUs, and
    dag.py's host memory (not measured here); the GPU memory the measured parts needed as a comment."""
    peak = {"train_tokenizer": m["tokenizer"].get("peak_gib"), "eval_tokenizer": m["codec"].get("peak_gib"),
            "tokenize": m["codec"].get("peak_gib"), "real_stats": m["i3d"].get("peak_gib"),
            "train_generator": max((r.get("peak_gib") or 0 for r in m["generators"].values()), default=None),
            "eval_generator": max((r.get("peak_gib") or 0 for r in m["sampling"].values()), default=None)}
    lines = ["set-resources:"]
    for stage in ("real_stats", "train_tokenizer", "eval_tokenizer", "tokenize", "train_generator", "eval_generator"):
        walls = [r["wall_h"] for r in rows if r["stage"] == stage and r["wall_h"] is not None]
        if not walls:
            continue
        res = dag.PAPER[stage]
        gpu_mem = f", peak GPU memory measured {peak[stage]:.1f} GiB" if peak[stage] else ""
        lines += [f"  {stage}:  # longest entry {max(walls):.2f} h on {res['gpu']} GPU(s) x {MARGIN}{gpu_mem}",
                  f"    gpu: {res['gpu']}", f"    mem_mb: {res['mem_mb']}  # host memory: dag.py's, not measured",
                  f"    runtime: {max(1, math.ceil(max(walls) * 60 * MARGIN))}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# output


def fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def parts_table(m: dict) -> list[str]:
    lines = ["| part | what | batch (per GPU) | step / batch s | samples/s | peak GiB | out of memory at |",
             "|---|---|---|---|---|---|---|"]
    t, c, i = m["tokenizer"], m["codec"], m["i3d"]

    def row(part, what, batch, sec, rate, peak, oom=()):
        lines.append(f"| {part} | {what} | {batch if batch is not None else '-'} | {fmt(sec, '.4f')} | {fmt(rate)} "
                     f"| {fmt(peak, '.1f')} | {', '.join(map(str, oom)) or '-'} |")

    row("train_tokenizer", t.get("what", "base"), t.get("batch"), t.get("step_s"), t.get("samples_s"),
        t.get("peak_gib"), t["oom"])
    row("tokenizer encode", c["what"], c["batch"], c["encode_s"], c["encode_cps"], c["peak_gib"])
    row("tokenizer decode", c["what"], c["batch"], c["decode_s"], c["decode_cps"], c["peak_gib"])
    for name, r in m["generators"].items():
        row(f"train_generator {name}", r.get("what", "not measured (time budget or limit)" if r.get("skipped") else name),
            r.get("batch"), r.get("step_s"), r.get("samples_s"), r.get("peak_gib"), r["oom"])
    for name, r in m["sampling"].items():
        row(f"sampling {name}", r["what"], r["batch"], r["batch_s"], r["batch"] / r["batch_s"], r["peak_gib"])
    row("i3d", i["what"], i["batch"], i["batch"] / i["cps"], i["cps"], i["peak_gib"])
    return lines


def zero_note(m: dict, gpus: int) -> str:
    r, p = m["generators"]["3b"], m["params"]["3b"]
    z = zero2_gib(p, gpus)
    if r.get("skipped"):
        fit = "plain AdamW on one GPU not measured (time budget)"
    elif r.get("batch"):
        fit = f"plain AdamW on one GPU fit at batch {r['batch']} (peak {fmt(r.get('peak_gib'), '.1f')} GiB)"
    else:
        fit = f"plain AdamW on one GPU did not fit (out of memory at batch {', '.join(map(str, r['oom']))})"
    return (f"3B ({p / 1e9:.2f}B parameters at the K600 vocabulary): {fit}. Model state per GPU (fp32 weights, "
            f"gradients, Adam moments = 16 B/parameter): {z['adamw']:.1f} GiB with plain AdamW / DDP; with DeepSpeed "
            f"ZeRO-2 over {gpus} GPUs (gradients and moments sharded, weights replicated: 4 + 12/{gpus} B/parameter) "
            f"{z['zero2']:.1f} GiB, leaving {z['adamw'] - z['zero2']:.1f} GiB more per GPU for activations.")


def plan_table(rows: list[dict]) -> list[str]:
    lines = ["| suite | stage | entry | work | GPUs | GPU-hours | wall hours | disk GB | rate |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['suite']} | {r['stage']} | {r['entry']} | {r['work']} | {r['gpus']} | {fmt(r['gpu_h'], '.1f')} "
                     f"| {fmt(r['wall_h'], '.1f')} | {fmt(r['disk_gb'], '.1f') if r['disk_gb'] else '-'} | {r['note']} |")
    lines += ["", "| suite | GPU-hours | clip cache + token shards GB |", "|---|---|---|"]
    for suite in dict.fromkeys(r["suite"] for r in rows):
        mine = [r for r in rows if r["suite"] == suite]
        gh = sum(r["gpu_h"] for r in mine if r["gpu_h"] is not None)
        lines.append(f"| {suite} | {gh:,.0f} | {sum(r['disk_gb'] for r in mine):,.1f} |")
    once = {(r["stage"], r["entry"]): r for r in rows}.values()  # k600_ablations shares k600's data, tokenizer, 2 models
    gh = sum(r["gpu_h"] for r in once if r["gpu_h"] is not None)
    lines.append(f"| all three (shared stages once) | {gh:,.0f} | {sum(r['disk_gb'] for r in once):,.1f} |")
    missing = sorted({f"{r['stage']} {r['entry']}" for r in rows if r["gpu_h"] is None})
    if missing:
        lines += ["", f"Not in the sums (not measured): {', '.join(missing)}."]
    return lines


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda})"
    return (f"CPU, {torch.get_num_threads()} threads ({os.cpu_count()} cores visible), torch {torch.__version__}, "
            f"load average {os.getloadavg()[0]:.2f}")


def markdown(a, m: dict, rows: list[dict], cmd: str) -> str:
    device = torch.device(a.device)
    head = (f"Device: {device_label(device)}. Command: `{cmd}`. Random weights (LPIPS's VGG16 too: timing does not "
            f"depend on them). Steps: median of {a.steps} after {a.warmup} warm-up (generator training: mean, "
            f"benchmarks/generator_speed.py); batches halve on out-of-memory from the recipe's per-GPU share."
            + (" TINY smoke run (small presets and sizes): the numbers say nothing about the paper's cost." if a.tiny
               else ""))
    lines = [head, "", *parts_table(m), "", zero_note(m, a.gpus), "",
             f"### Plan (params.yaml entries; rates per GPU from the parts above; K600 {VIDEOS['k600']['train']:,} train "
             f"/ {VIDEOS['k600']['val']:,} val videos as listed, UCF-101 split 1 {VIDEOS['ucf101']['train']:,} / "
             f"{VIDEOS['ucf101']['test']:,})", "",
             "GPU-hours = work / samples-per-second-per-GPU (training: steps x global batch; eval_generator: videos x "
             "seeds x (K600: encode the context + generation + decode + I3D)); "
             "wall hours = GPU-hours / the rule's GPUs (dag.py), without "
             "data-loading, checkpoint or communication time. Disk: uint8 clips (prepare) and token shards (tokenize).",
             "", *plan_table(rows), "",
             f"Suggested `set-resources` for workflow/profiles/slurm/config.yaml (runtime in minutes = the longest "
             f"entry's wall time x {MARGIN}; not written to the profile):", "", "```yaml", slurm_resources(rows, m), "```"]
    return "\n".join(lines) + "\n"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--params", default=str(ROOT / "params.yaml"))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs that share the 3B optimizer state under ZeRO-2")
    p.add_argument("--tok-batch", type=int, default=None, help="first micro batch (default: recipe batch / rule GPUs)")
    p.add_argument("--gen-batch", type=int, default=None, help="first batch (default: K600 recipe batch / rule GPUs)")
    p.add_argument("--codec-batch", type=int, default=16)
    p.add_argument("--sample-batch", type=int, default=None, help="default: eval_generator's batch_size")
    p.add_argument("--i3d-batch", type=int, default=16)
    p.add_argument("--attention", default="flex", choices=["flex", "sdpa"])
    p.add_argument("--budget", type=float, default=None,
                   help="seconds after which the remaining generator parts are skipped (marked in the output)")
    p.add_argument("--reuse-json", default=None,
                   help="benchmarks/generator_speed.py --json output: its base row is used instead of measuring base")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: small presets and sizes, 1 step")
    p.add_argument("--md", default=str(ROOT / "results" / "speed.md"), help="'' to write nothing")
    a = p.parse_args(argv)
    a.tok_entry, a.tok_preset, a.frames, a.size = "k600", "base", 17, 128
    a.gen_presets, a.grid, a.block, a.context, a.vocab, a.i3d_frames = ["base", "xl", "3b"], LATENT, (1, 1, 16), 2, 64000, 16
    if a.tiny:
        a.tok_preset, a.size, a.gen_presets, a.grid, a.block, a.vocab = "small", 32, ["tiny"] * 3, (5, 4, 4), (1, 1, 4), 1000
        a.warmup, a.steps, a.i3d_frames, a.attention = 0, 1, 9, "sdpa"
        a.tok_batch, a.gen_batch, a.codec_batch, a.sample_batch, a.i3d_batch = (a.tok_batch or 2), (a.gen_batch or 2), 2, 2, 1
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.setdefault("NBP_PROGRESS", "0")
    os.environ.setdefault("WANDB_MODE", "disabled")
    cfg = load_config(a.params)
    a.tok_batch = a.tok_batch or cfg.train_tokenizer[a.tok_entry].batch_size // dag.PAPER["train_tokenizer"]["gpu"]
    a.gen_batch = a.gen_batch or cfg.train_generator["k600_base_nbp16"].batch_size // dag.PAPER["train_generator"]["gpu"]
    a.sample_batch = a.sample_batch or cfg.eval_generator["k600_base_nbp16"].batch_size
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    cmd = "python benchmarks/resource_plan.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def report(m: dict) -> str:
        rows = [r for suite in PAPER_SUITES for r in plan_rows(cfg, m, suite)]
        body = markdown(a, m, rows, cmd.strip())
        if a.md:
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
            write_markdown_section(Path(a.md), f"{KEY}_{device.type}", f"Resource plan from measurements ({name})", body)
        return body

    with tempfile.TemporaryDirectory() as tmp:
        random_lpips_files(Path(tmp))
        m = measure(a, device, report)
    print(report(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
