"""Where a CPU training step's time goes: forward/backward/optimizer versus data, logging and checkpoints.

Runs the real stages (``nbp.tokenizer.train.run_train_tokenizer``, ``nbp.generator.train.run_train_generator``)
of the embedded recipe with only their step counts changed (cadence of logging, history rows, validation and
checkpoints as in params.yaml), after building their inputs with the real upstream stages (download, prepare,
tokenize) in a temporary ``run.out``. Timers wrap the pieces of the shared loop:

- ``loop``: the whole of ``nbp.training.fit`` (resume, W&B set-up, every step, history, checkpoints, export);
- ``step``: ``Training.train_step`` (data + forward + backward + optimizer);
- ``data``: inside the step, building the batch (tokenizer: ``batch_tensor``; generator: ``inputs``);
- ``checkpoint``: ``training._save`` (rolling checkpoint + run.json);
- ``validation``: the generator's validation loss at each history row (counted apart: it is evaluation work
  the recipe asks for, not overhead of a step).

overhead = data + (loop - step - validation); its share = overhead / (loop - validation). Writes the
``training_overhead_cpu`` section of ``results/speed.md``.

    python benchmarks/training_overhead.py                       # embedded recipe, 300 + 480 steps
    python benchmarks/training_overhead.py --tiny --md /tmp/s.md # seconds (the smoke test)
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from nbp import dag, training  # noqa: E402
from nbp.config import load_config  # noqa: E402
from nbp.data.download import run_download  # noqa: E402
from nbp.data.prepare import run_prepare  # noqa: E402
from nbp.generator import train as gen_train  # noqa: E402
from nbp.io import write_markdown_section  # noqa: E402
from nbp.tokenizer import train as tok_train  # noqa: E402
from nbp.tokenizer.tokenize import run_tokenize  # noqa: E402

TINY = {
    "download.embedded.embedded": {"classes": 2, "train_per_class": 4, "test_per_class": 1, "size": 32, "frames": 20,
                                   "fps": 8, "seed": 0},
    "train_tokenizer.embedded.preset": "small", "train_tokenizer.embedded.channels": 8,
    "train_tokenizer.embedded.batch_size": 2, "train_tokenizer.embedded.image_batch_size": 2,
    "train_tokenizer.embedded.image_steps": 2, "train_tokenizer.embedded.disc_start": 3,
    "train_tokenizer.embedded.checkpoint_every": 2, "train_tokenizer.embedded.log_every": 1,
    "train_generator.embedded_nbp.val_every": 2, "train_generator.embedded_nbp.val_clips": 2,
    "train_generator.embedded_nbp.checkpoint_every": 2, "train_generator.embedded_nbp.log_every": 1,
    "train_generator.embedded_nbp.batch_size": 2,
}


class Clock:
    """Sums of wall seconds per piece, filled by the wrappers :meth:`wrap` installs."""

    def __init__(self):
        self.total: dict[str, float] = {}
        self.active: set[str] = set()

    def wrap(self, owner, attr: str, key: str, inside: str | None = None) -> None:
        """Time ``owner.attr`` under ``key`` (with ``inside``: only while a call timed as ``inside`` runs)."""
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if inside is not None and inside not in self.active:
                return fn(*args, **kwargs)
            self.active.add(key)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.active.discard(key)
                self.total[key] = self.total.get(key, 0.0) + time.perf_counter() - t0

        setattr(owner, attr, timed)


def instrument(clock: Clock) -> None:
    # fit and _save are looked up as module globals of nbp.training (and fit by the stage modules)
    for mod in (training, gen_train, tok_train):
        if hasattr(mod, "fit"):
            clock.wrap(mod, "fit", "loop")
    clock.wrap(training, "_save", "checkpoint")
    clock.wrap(tok_train.TokenizerTraining, "train_step", "step")
    clock.wrap(tok_train, "batch_tensor", "data", inside="step")
    clock.wrap(gen_train.GeneratorTraining, "train_step", "step")
    clock.wrap(gen_train.GeneratorTraining, "inputs", "data", inside="step")  # validate() calls it too
    clock.wrap(gen_train.GeneratorTraining, "validate", "validation")


def measure(run, clock: Clock) -> dict[str, float]:
    clock.total = {}
    run()
    t = dict(clock.total)
    t.setdefault("validation", 0.0)
    outside = t["loop"] - t["step"] - t["validation"]
    t["outside"] = outside
    t["overhead"] = t["data"] + outside
    t["share"] = t["overhead"] / max(t["loop"] - t["validation"], 1e-9)
    return t


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--tokenizer-steps", type=int, default=300)
    ap.add_argument("--generator-steps", type=int, default=480)
    ap.add_argument("--tiny", action="store_true", help="a seconds-long run (smoke test)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--md", default=str(ROOT / "results" / "speed.md"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("NBP_PROGRESS", "0")
    ts, gs = (4, 4) if args.tiny else (args.tokenizer_steps, args.generator_steps)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as out:
        over = {"run.out": out, "run.wandb.mode": "disabled", "run.device": "cpu",
                "train_tokenizer.embedded.steps": ts, "train_generator.embedded_nbp.steps": gs,
                **(TINY if args.tiny else {})}
        if args.tiny:
            over["train_tokenizer.embedded.disc_start"] = min(3, ts - 1)
        cfg = load_config(args.params, over)
        run_download(cfg, "embedded")
        run_prepare(cfg, "embedded")
        clock = Clock()
        instrument(clock)
        tok = measure(lambda: tok_train.run_train_tokenizer(cfg, "embedded"), clock)
        run_tokenize(cfg, "embedded")
        gen = measure(lambda: gen_train.run_train_generator(cfg, "embedded_nbp"), clock)
        assert dag.resolve(cfg, "train_generator", "embedded_nbp").outputs["generator"].is_file()
    rows = [("train_tokenizer embedded", ts, tok), ("train_generator embedded_nbp", gs, gen)]
    lines = [f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}; load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}. "
             f"`python benchmarks/training_overhead.py{' --tiny' if args.tiny else ''}` (the embedded recipe, only the "
             "step counts changed; logging, history, validation and checkpoint cadence as in params.yaml).", "",
             "| stage | steps | loop s | step s | data s | checkpoints s | other outside steps s | validation s | "
             "overhead share (target <= 5%) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, steps, t in rows:
        other = t["outside"] - t.get("checkpoint", 0.0)
        lines.append(f"| {name} | {steps} | {t['loop']:.2f} | {t['step']:.2f} | {t['data']:.2f} | "
                     f"{t.get('checkpoint', 0.0):.2f} | {other:.2f} | {t['validation']:.2f} | {100 * t['share']:.1f}% |")
    lines += ["", "overhead = data + (loop - steps - validation), as a share of (loop - validation); the generator's "
              "validation (its `val_loss` history column) is reported apart."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_markdown_section(Path(args.md), "training_overhead_cpu", "Training step overhead on CPU (issue 14, item 4)",
                           text)


if __name__ == "__main__":
    main()
