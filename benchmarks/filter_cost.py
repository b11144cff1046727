"""Where the CPU filter's time goes: the sort-free draw (`sampling._draw_filtered`) on the logits of a real
generation, whole and by its passes, against the budget that "sampled within 15 % of greedy" leaves it.

The benchmark's model (as ``sampling_speed.py``: 4 layers, width 512, 64K codes, K600 protocol, NBP 1x1x16,
batch 1) generates one video with the evaluation filter (top-k 16,000, top-p 0.9); the logits of each of its steps
are kept. Then, interleaved over ``--repeats`` repeats, each timed over all the kept steps (median, min-max, per
step):

- greedy generation (its seconds per step set the budget: 15 % of a greedy step, plus the ``argmax`` the draw
  replaces);
- the whole draw, on ``--threads`` threads and on one;
- ``argmax`` (what greedy does instead);
- the draw's passes over the whole block of logits, each as the draw calls it: the row maximum, the weights
  (``weights``: ``exp(x - max)`` beside a row of ones), their chunk sums, the sample's ``topk``, the counting pass
  (``counts_masses``) at 1 to 4 thresholds a row, and the two-level inverse CDF of a round of draws;
- what remains: the whole draw less the row maximum, weights, chunk sums, ``topk``, two counting passes at two
  thresholds and the inverse CDF (the bookkeeping on a few values a row, the exact decisions, the standing passes).

With ``--fused-c`` (needs a C compiler, ``cc``): ``benchmarks/fused_count.c``, compiled here with ``-O3
-march=native -ffast-math`` and loaded with ctypes, does the weights, chunk sums and counts at four thresholds in one
pass; it is checked against the torch ops (counts equal, weights and masses to float rounding) and timed against
them, both on one thread. It measures what a compiled kernel would save; the package does not use it.

Writes the ``filter_cost_cpu`` section of ``results/speed.md``.

    python benchmarks/filter_cost.py                      # the issue's setting
    python benchmarks/filter_cost.py --fused-c            # also: one compiled pass against the torch ops
    python benchmarks/filter_cost.py --tiny --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from embedded_seeds import machine  # noqa: E402
from sampling_speed import frame_task, model_args  # noqa: E402

from nbp.generator import sampling as S  # noqa: E402
from nbp.generator.model import GPT, GPTConfig  # noqa: E402
from nbp.io import write_markdown_section  # noqa: E402

KEY = "filter_cost"
TARGET = 1.15  # sampled / greedy, issue 14


@contextlib.contextmanager
def kept_logits(into: list[torch.Tensor]):
    """Keep a copy of the logits every CPU draw is given (after temperature) while generating."""
    draw = S._draw_filtered

    def keep(x, *args, **kwargs):
        into.append(x.detach().clone())
        return draw(x, *args, **kwargs)

    S._draw_filtered = keep
    try:
        yield
    finally:
        S._draw_filtered = draw


def per_step(fn, steps: list[torch.Tensor]) -> float:
    """Seconds per step of ``fn(x)`` over the kept steps."""
    t0 = time.perf_counter()
    for x in steps:
        fn(x)
    return (time.perf_counter() - t0) / len(steps)


def parts(top_k: int, top_p: float, threads: int, steps: list[torch.Tensor]) -> dict[str, object]:
    """label -> a function of one step's logits x [n, V] that runs that part as the draw does."""
    n, V = steps[0].shape
    buf = torch.empty(4 * n * V)
    J = S.sample_ranks(top_k, S.strided_sample(steps[0]).shape[1], V)[1] + 1  # the sample's largest kept
    ready = {}  # id(x) -> (m, w2, chunk sums, cumulative chunk sums, thresholds) of a step, made once

    def prep(x):
        if id(x) not in ready:
            m = x.amax(-1, keepdim=True)
            w2 = S.weights(x, m).clone()
            cw = S._chunked(w2[:, 1]).sum(-1)
            q = torch.quantile(x[:, ::97], torch.tensor([0.95, 0.9, 0.8, 0.75]), dim=-1).T.contiguous()  # [n, 4]
            ready[id(x)] = (m, w2, cw.double().cumsum(-1), q)
        return ready[id(x)]

    for x in steps:
        prep(x)

    def whole(nthreads):
        def run(x):
            torch.set_num_threads(nthreads)
            S._draw_filtered(x, top_k, top_p, torch.Generator().manual_seed(0))
            torch.set_num_threads(threads)
        return run

    out = {"whole draw": whole(threads), "whole draw, one thread": whole(1), "argmax (greedy)": lambda x: x.argmax(-1),
           "row maximum": lambda x: x.amax(-1, keepdim=True),
           "weights": lambda x: S.weights(x, prep(x)[0]),
           "chunk sums": lambda x: S._chunked(prep(x)[1][:, 1]).sum(-1),
           "sample topk": lambda x: S.strided_sample(x).topk(J, -1)}
    for q in (1, 2, 3, 4):
        out[f"counting pass, {q} threshold{'s' if q > 1 else ''}"] = (
            lambda x, q=q: S.counts_masses(x, prep(x)[1], prep(x)[3][:, :q], buf))
    out["inverse CDF, 12 draws a row"] = lambda x: S._inverse_cdf(
        S._chunked(prep(x)[1][:, 1]), prep(x)[2], None, S.FULL_CANDIDATES, torch.Generator().manual_seed(0))
    return out


def fused_c(steps: list[torch.Tensor], workdir: str):
    """(check line, {label: fn}) for --fused-c: the compiled pass and the torch ops it replaces, one thread each."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("filter_cost: --fused-c needs a C compiler (cc) on PATH")
    lib_path = os.path.join(workdir, "libfused_count.so")
    src = Path(__file__).resolve().parent / "fused_count.c"
    res = subprocess.run([cc, "-O3", "-march=native", "-ffast-math", "-shared", "-fPIC", "-o", lib_path, str(src), "-lm"],
                         capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"filter_cost: compiling {src} failed: {res.stderr.strip()[:500]}")
    lib = ctypes.CDLL(lib_path)
    ptr = ctypes.c_void_p
    lib.fused_count.argtypes = [ptr, ptr, ptr, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ptr, ptr, ptr, ptr]
    n, V = steps[0].shape
    q = 4
    w, cs = torch.empty(n, V), torch.empty(n, V // S.CHUNK)
    c, z = torch.empty(n, q), torch.empty(n, q)
    th = {id(x): torch.quantile(x[:, ::97], torch.tensor([0.95, 0.9, 0.8, 0.75]), dim=-1).T.contiguous() for x in steps}
    buf = torch.empty(2 * n * V)

    def fused(x):
        m = x.amax(-1)
        t = th[id(x)]
        if lib.fused_count(x.data_ptr(), m.data_ptr(), t.data_ptr(), n, V, q, S.CHUNK, w.data_ptr(), cs.data_ptr(),
                           c.data_ptr(), z.data_ptr()):
            raise SystemExit("filter_cost: fused_count refused its arguments")

    def ops(x):
        m = x.amax(-1, keepdim=True)
        w2 = S.weights(x, m)
        S._chunked(w2[:, 1]).sum(-1)
        t = th[id(x)]
        return [S.counts_masses(x, w2, t[:, :2], buf), S.counts_masses(x, w2, t[:, 2:], buf)], w2

    worst = [0.0, 0.0]  # relative error of the weights, of the masses
    same_counts = True
    for x in steps:
        fused(x)
        (c1, z1), (c2, z2) = ops(x)[0]
        w2 = ops(x)[1]
        same_counts &= torch.equal(c, torch.cat([c1, c2], 1))
        worst[0] = max(worst[0], float(((w - w2[:, 1]).abs() / w2[:, 1].clamp(min=1e-30)).max()))
        worst[1] = max(worst[1], float(((z - torch.cat([z1, z2], 1)).abs() / w2[:, 1].sum(-1, keepdim=True)).max()))
    if not same_counts:
        raise SystemExit("filter_cost: the compiled pass's counts differ from counts_masses'")
    check = (f"The compiled pass against the torch ops on all {len(steps)} steps: counts equal; weights within "
             f"{worst[0]:.1e} relative, masses within {worst[1]:.1e} of the row's weight.")

    def one_thread(fn):
        def run(x):
            torch.set_num_threads(1)
            fn(x)
        return run

    return check, {"torch ops, one thread: row max, weights, chunk sums, 2 counting passes at 2 thresholds":
                   one_thread(ops), "one compiled pass, one thread: the same (row max by torch)": one_thread(fused)}


PASSES = ["row maximum", "weights", "chunk sums", "sample topk", "counting pass, 2 thresholds",
          "counting pass, 2 thresholds", "inverse CDF, 12 draws a row"]  # what one draw runs over the whole block


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:.2f} ({min(xs) * 1e3:.2f}-{max(xs) * 1e3:.2f})"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_args(p)
    p.add_argument("--top-k", type=int, default=16000)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fused-c", action="store_true", help="also time one compiled pass (benchmarks/fused_count.c)")
    p.add_argument("--tiny", action="store_true", help="smoke size: 1 layer, width 64, grid 3x4x4, 20,480 codes")
    p.add_argument("--md", default="results/speed.md", help="'' to write nothing")
    a = p.parse_args(argv)
    if a.tiny:
        a.n_layer, a.n_embd, a.n_head, a.vocab, a.grid, a.block, a.top_k = 1, 64, 2, 20480, [3, 4, 4], 4, 5000
    return a


def main(argv=None) -> int:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=a.vocab, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd))
    model.prepare_inference(device=torch.device("cpu"))
    task = frame_task(a.grid, (1, 1, a.block), a.vocab, a.context_frames)
    context = torch.randint(0, a.vocab, (1, *a.grid), generator=torch.Generator().manual_seed(0))
    prompt = S.prompt_ids(task, context=context)
    load0 = os.getloadavg()
    print(f"load average before: {load0}", flush=True)
    steps: list[torch.Tensor] = []
    tmp = tempfile.TemporaryDirectory()
    with kept_logits(steps):
        S.generate(model, task, prompt, generator=torch.Generator().manual_seed(0), top_k=a.top_k, top_p=a.top_p)
    if not steps:
        raise SystemExit("filter_cost: the generation made no CPU draw (nothing to time)")
    if S._chunked(steps[0]) is None:
        raise SystemExit(f"filter_cost: {steps[0].shape[1]} logits a row is not a multiple of the draw's chunk of "
                         f"{S.CHUNK}: its proposal would be cut first (choose --vocab accordingly)")
    fns = parts(a.top_k, a.top_p, a.threads, steps)
    check = ""
    if a.fused_c:
        check, more = fused_c(steps, tmp.name)
        fns |= {k: (lambda x, f=f: (f(x), torch.set_num_threads(a.threads))) for k, f in more.items()}
    times: dict[str, list[float]] = {"greedy generation": [], "sampled generation": [], **{k: [] for k in fns}}
    for r in range(a.repeats + 1):  # the first repeat warms up and is dropped
        t0 = time.perf_counter()
        S.generate(model, task, prompt, greedy=True)
        greedy = (time.perf_counter() - t0) / len(steps)
        t0 = time.perf_counter()
        S.generate(model, task, prompt, generator=torch.Generator().manual_seed(r), top_k=a.top_k, top_p=a.top_p)
        sampled = (time.perf_counter() - t0) / len(steps)
        got = {k: per_step(f, steps) for k, f in fns.items()}
        if r:
            times["greedy generation"].append(greedy)
            times["sampled generation"].append(sampled)
            for k, v in got.items():
                times[k].append(v)
    load1 = os.getloadavg()
    print(f"load average after: {load1}", flush=True)
    # paired per repeat: the rest of the draw, the ratio, the budget
    rest = [w - sum(times[p][i] for p in PASSES) for i, w in enumerate(times["whole draw"])]
    ratio = [s / g for s, g in zip(times["sampled generation"], times["greedy generation"])]
    budget = [(TARGET - 1) * g + am for g, am in zip(times["greedy generation"], times["argmax (greedy)"])]
    n, V = steps[0].shape
    cmd = "python benchmarks/filter_cost.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"`{cmd.strip()}`: {a.n_layer} layers, width {a.n_embd}, {a.vocab:,} codes, NBP 1x1x{a.block}, "
             f"grid {'x'.join(map(str, a.grid))} with {a.context_frames} context frames, batch 1, {a.threads} threads; "
             f"top-k {a.top_k:,}, top-p {a.top_p}; the draw's input: {len(steps)} steps of {n} x {V:,} logits from one "
             f"sampled generation. Milliseconds per step, median (min-max) of {a.repeats} interleaved repeats. "
             f"CPU: {machine()}; torch {torch.__version__}. Load average {load0[0]:.2f} before, {load1[0]:.2f} "
             "after.", "",
             "| | ms per step |", "|---|---|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in times.items()]
    lines += [f"| the rest of the draw (whole draw less the passes it runs: {', '.join(dict.fromkeys(PASSES))}; "
              f"the counting pass twice) | {fmt(rest)} |",
              f"| budget of the draw for sampled / greedy <= {TARGET} ({TARGET - 1:.2f} x a greedy step + argmax) "
              f"| {fmt(budget)} |", "",
              f"Sampled / greedy generation, paired per repeat: {statistics.median(ratio):.3f} "
              f"({min(ratio):.3f}-{max(ratio):.3f}).", ""] + ([check, ""] if check else [])
    body = "\n".join(lines) + "\n"
    print(body)
    if a.md:
        write_markdown_section(Path(a.md), f"{KEY}_cpu", "The CPU filter's cost, whole and by pass "
                               "(benchmarks/filter_cost.py)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
