"""The training loop that the tokenizer and the generator share.

A training says what one optimizer step is (:class:`Training`); :func:`fit` does the rest, the same way for both:

1. resume: a rolling checkpoint ``{state}/last.pt`` (``run.json`` beside it describes its run) is resumed when it was
   made with the same settings and inputs, and deleted otherwise (one rule: :func:`stale_keys`), so a DVC/Snakemake
   rerun after an upstream change starts over;
2. each step: learning rate from :func:`warmup_cosine`, the training's step, then the non-finite guard (a NaN or inf
   loss or gradient norm stops the run with one line naming the stage, the step and the last good checkpoint; no
   declared output is written and the rolling checkpoint keeps its last good state; no batch is ever skipped);
3. every ``row_every`` steps a history row (means over the steps since the last row), W&B every ``log_every``;
4. every ``checkpoint_every`` steps, at the end, and on SIGTERM (Slurm's time limit): the rolling checkpoint, with
   every rank's RNG state, the loop state and the W&B run id; after a SIGTERM the process exits non-zero so that
   the scheduler's ``retries`` resumes it;
5. at the end the training exports its declared outputs (atomically).

On CPU a killed and resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from nbp.checkpoint import load_checkpoint, save_checkpoint
from nbp.dag import StagePaths
from nbp.distributed import DistInfo, sync
from nbp.errors import NbpError
from nbp.io import atomic_dir, fault, write_json
from nbp.tracking import Tracker, progress

# params that cannot change what a run computes: a rolling checkpoint made with other values is still resumed
RESUME_SAFE_KEYS = ("checkpoint_every",)


class NonFiniteError(NbpError):
    """A loss or gradient norm that is NaN or infinite: the run stops before anything is written."""


class Preempted(NbpError):
    """SIGTERM (a scheduler's time limit): the rolling checkpoint was written; rerunning the stage resumes."""


def warmup_cosine(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """The learning rate of ``step``: linear warm-up over ``warmup`` steps, then cosine from ``lr`` to ``min_lr``
    at ``total``."""
    if step < warmup:
        return lr * ((step + 1) / warmup)
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    ratio = min_lr / lr
    return lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


# --------------------------------------------------------------------------------------
# RNG states (torch, CUDA, numpy, Python), one per rank


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": torch.tensor(py_state[1], dtype=torch.int64)},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def gather_rng(info: DistInfo) -> list[dict]:
    """Every rank's RNG state (rank order)."""
    mine = rng_state()
    if not info.enabled:
        return [mine]
    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, mine)
    return states


def restore_rng(states: list[dict], info: DistInfo) -> None:
    """This rank's saved state; with another world size only the data order resumes exactly, not random noise."""
    if len(states) == info.world_size:
        set_rng_state(states[info.rank])


# --------------------------------------------------------------------------------------
# what a training provides


@dataclass
class LoopState:
    """Saved in every rolling checkpoint, so a resumed run continues its counters, history and W&B run."""

    step: int = 0
    seconds: float = 0.0  # time spent in training steps
    history: list[dict] = field(default_factory=list)
    window: dict[str, list[float]] = field(default_factory=dict)  # per-step values since the last history row
    wandb_run_id: str | None = None


@dataclass(frozen=True)
class Cadence:
    steps: int
    row_every: int  # a history row (and validation, where the training has one)
    log_every: int  # W&B scalars
    checkpoint_every: int


class Training:
    """One training: the model, its optimizers and data. Subclasses implement the methods that raise."""

    stage: str
    name: str
    info: DistInfo
    device: torch.device
    tracker: Tracker | None = None
    train_format: str = ""
    shown: tuple[str, ...] = ("loss",)  # history keys on the progress bar

    def describe(self) -> dict:
        """Settings and inputs that define the run (JSON-able): a rolling checkpoint with others is not resumed."""
        raise NotImplementedError

    def set_lr(self, step: int) -> float:
        raise NotImplementedError

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step; returns its scalars: at least ``loss``, and ``grad_norm`` where clipping measures it."""
        raise NotImplementedError

    def history_row(self, state: LoopState) -> dict:
        """The history row after ``state.step`` from the per-step values since the last row (``state.window``)."""
        return {"step": state.step, **{k: float(np.mean(v)) for k, v in state.window.items()}}

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, ckpt: dict) -> None:
        raise NotImplementedError

    def export(self, state: LoopState) -> None:
        """Write the declared outputs (atomically)."""
        raise NotImplementedError

    def on_checkpoint(self, step: int) -> None:
        """Called after each rolling checkpoint (e.g. to log media to W&B)."""

    # ---- the rolling checkpoint: one file written by rank 0 (DeepSpeed overrides these two) ----
    def save(self, ckpt_dir: Path, client: dict) -> None:
        if self.info.is_main:
            save_checkpoint(ckpt_dir / "last.pt", {**client, **self.state_dict()})
        barrier(self.info)

    def read(self, ckpt_dir: Path) -> dict | None:
        """The rolling checkpoint's contents (not applied yet), or None when there is none."""
        path = ckpt_dir / "last.pt"
        return load_checkpoint(path, map_location="cpu", expect=self.train_format) if path.is_file() else None


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def resume_params(params: dict) -> dict:
    """An entry's params without the keys that cannot change a run."""
    return {k: v for k, v in params.items() if k not in RESUME_SAFE_KEYS}


def stale_keys(saved: dict, mine: dict) -> list[str]:
    """What differs between a rolling checkpoint's run and this one (the one start-over rule of both trainings)."""
    return [k for k in mine if saved.get(k) != mine[k]]


# --------------------------------------------------------------------------------------
# the loop


def _start_over(training: Training, ckpt_dir: Path, stale: list[str]) -> None:
    if training.info.is_main:
        print(f"{training.stage} {training.name}: rolling checkpoint in {ckpt_dir} was made with other "
              f"{', '.join(stale)}; starting over")
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    barrier(training.info)


def resume(training: Training, ckpt_dir: Path) -> LoopState:
    """The loop state of a resumable rolling checkpoint (applied to the training), or a fresh one."""
    mine = json.loads(json.dumps(training.describe()))  # as run.json holds it
    if training.info.is_main and ckpt_dir.is_dir():  # what a kill inside a checkpoint write left (nbp.io.atomic_path)
        for tmp in ckpt_dir.glob(".*.tmp"):
            tmp.unlink()
    barrier(training.info)
    run_file = ckpt_dir / "run.json"
    if run_file.is_file() and (stale := stale_keys(json.loads(run_file.read_text()), mine)):
        _start_over(training, ckpt_dir, stale)
    client = training.read(ckpt_dir)
    if client is None:
        return LoopState()
    if stale := stale_keys(client.get("run", {}), mine):  # no run.json beside it: the checkpoint's own description
        _start_over(training, ckpt_dir, stale)
        return LoopState()
    training.load_state_dict(client)
    restore_rng(client["rng"], training.info)
    state = LoopState(**client["state"])
    if training.info.is_main:
        print(f"{training.stage} {training.name}: resumed at step {state.step}")
    return state


def _check_finite(training: Training, step: int, values: dict[str, float], ckpt_dir: Path, last_good: int) -> None:
    bad = [k for k in ("loss", "grad_norm") if k in values and not math.isfinite(values[k])]
    if bad:
        where = f"{ckpt_dir / 'last.pt'} (step {last_good})" if last_good else "none (no checkpoint written yet)"
        raise NonFiniteError(f"{training.stage} {training.name}: {' and '.join(bad)} = "
                             f"{', '.join(str(values[k]) for k in bad)} at step {step + 1}; training stopped, no output "
                             f"written; last good rolling checkpoint: {where}")


@contextmanager
def _sigterm_flag() -> Iterator[dict]:
    """``flag["term"]`` turns true on SIGTERM; the loop checkpoints after the current step and stops."""
    flag = {"term": False}

    def handler(signum, frame):
        flag["term"] = True

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no handler
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, old)


def _save(training: Training, ckpt_dir: Path, state: LoopState) -> None:
    client = {"format": training.train_format, "version": 2, "run": training.describe(), "step": state.step,
              "state": asdict(state), "rng": gather_rng(training.info)}
    if training.info.is_main:
        write_json(ckpt_dir / "run.json", training.describe())
    training.save(ckpt_dir, client)


def fit(training: Training, cadence: Cadence, ckpt_dir: Path, wandb: dict, stop_at: int | None = None) -> bool:
    """Train to ``cadence.steps`` and export (True), or stop after step ``stop_at`` as a kill would (False).

    ``wandb``: :class:`nbp.tracking.Tracker` settings (project, entity, mode, config).
    """
    state = resume(training, ckpt_dir)
    tracker = Tracker(name=f"{training.stage}/{training.name}", run_id=state.wandb_run_id, dir=str(ckpt_dir),
                      rank=training.info.rank, **wandb)
    training.tracker = tracker
    state.wandb_run_id = tracker.run_id or state.wandb_run_id
    last_good = state.step
    bar = progress(total=cadence.steps, initial=state.step, desc=f"{training.stage} {training.name}", unit="step")
    try:
        with _sigterm_flag() as flag:
            while state.step < cadence.steps:
                lr = training.set_lr(state.step)
                t0 = time.perf_counter()
                values = training.train_step(state.step)
                sync(training.device)
                fault("step", training.stage)  # test hook: NBP_FAULT=step:<stage>@<n> kills after this process's n-th step
                dt = time.perf_counter() - t0
                _check_finite(training, state.step, values, ckpt_dir, last_good)
                state.step += 1
                state.seconds += dt
                for k, v in {**values, "lr": lr, "seconds": dt}.items():
                    state.window.setdefault(k, []).append(v)
                bar.update(1)
                logs = {f"train/{k}": v for k, v in values.items()} | {"lr": lr}
                end = state.step == cadence.steps
                row_due = state.step % cadence.row_every == 0 or end
                if row_due:
                    row = training.history_row(state)
                    state.window = {}
                    state.history.append(row)
                    logs |= {f"history/{k}": v for k, v in row.items() if k != "step"}
                    bar.set_postfix({k: f"{row[k]:.4g}" for k in training.shown if k in row})
                if row_due or state.step % cadence.log_every == 0:
                    tracker.log(logs, step=state.step)
                if state.step % cadence.checkpoint_every == 0 or end or flag["term"]:
                    _save(training, ckpt_dir, state)
                    last_good = state.step
                    training.on_checkpoint(state.step)
                if flag["term"] and not end:
                    raise Preempted(f"{training.stage} {training.name}: SIGTERM at step {state.step}; rolling checkpoint "
                                    f"written to {ckpt_dir}; rerun the stage to resume")
                if stop_at is not None and stop_at <= state.step < cadence.steps:
                    return False
    finally:
        bar.close()
        tracker.finish()
    training.export(state)
    barrier(training.info)
    return True


def export_released(paths: StagePaths, role: str, ckpt: dict, metrics: dict, history_columns: list[str] | None = None) -> None:
    """The outputs of a training stage that imported released weights: the checkpoint, an empty history, metrics."""
    with atomic_dir(paths.folder) as tmp:
        save_checkpoint(tmp / paths.name(role), ckpt)
        write_history(tmp / paths.name("history"), [], history_columns)
        write_json(tmp / paths.name("metrics"), metrics)


def write_history(path: Path, history: list[dict], columns: list[str] | None = None) -> None:
    """History rows as CSV (``columns``: their order; default: ``step`` then the other keys sorted)."""
    if columns is None:
        columns = ["step"] + sorted({k for row in history for k in row} - {"step"})
    pd.DataFrame(history, columns=columns).to_csv(path, index=False)
