"""The shared training loop (nbp.training): schedule, start-over rule, non-finite guard, SIGTERM, resume."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch

from nbp import dag
from nbp.config import load_config
from nbp.distributed import DistInfo
from nbp.training import (
    Cadence,
    LoopState,
    NonFiniteError,
    Preempted,
    Training,
    fit,
    resume_params,
    stale_keys,
    warmup_cosine,
    write_history,
)

REPO = Path(__file__).resolve().parent.parent
NO_WANDB = {"project": "nbp", "entity": None, "mode": "disabled", "config": {}}


def test_warmup_then_cosine_known_values():
    kw = {"lr": 2.0, "min_lr": 0.2, "warmup": 10, "total": 110}
    assert warmup_cosine(0, **kw) == pytest.approx(0.2)  # (0 + 1) / 10 of lr
    assert warmup_cosine(9, **kw) == pytest.approx(2.0)
    assert warmup_cosine(10, **kw) == pytest.approx(2.0)  # the cosine starts at lr
    assert warmup_cosine(60, **kw) == pytest.approx(1.1)  # half way: (lr + min_lr) / 2
    assert warmup_cosine(110, **kw) == pytest.approx(0.2) and warmup_cosine(500, **kw) == pytest.approx(0.2)
    # the committed embedded runs' rates, as LambdaLR (tokenizer) and the generator's own formula computed them
    for lr, min_lr, warm, total in ((2e-3, 1e-4, 30, 1000), (3e-3, 0.0, 128, 1440)):
        for s in range(total):
            if s < warm:
                old = lr * ((s + 1) / warm)
            else:
                ratio, frac = min_lr / lr, min(1.0, (s - warm) / max(1, total - warm))
                old = lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
            assert warmup_cosine(s, lr=lr, min_lr=min_lr, warmup=warm, total=total) == old


def test_one_start_over_rule():
    mine = {"config": {"n": 2}, "params": resume_params({"lr": 0.1, "checkpoint_every": 5}), "inputs": "abc"}
    assert "checkpoint_every" not in mine["params"]  # a cadence change resumes
    assert stale_keys(mine, mine) == []
    assert stale_keys({**mine, "inputs": "other"}, mine) == ["inputs"]
    assert stale_keys({**mine, "params": {"lr": 0.2}}, mine) == ["params"]
    assert stale_keys({}, mine) == ["config", "params", "inputs"]


class Toy(Training):
    """Least squares y = x @ w on batches that are a pure function of the step; optional NaN at one step."""

    train_format = "toy-train"

    def __init__(self, out: Path, steps: int = 12, lr: float = 0.1, nan_at: int | None = None, on_step=None):
        self.stage, self.name, self.info, self.device = "toy", "t", DistInfo(), torch.device("cpu")
        self.out, self.steps, self.base_lr, self.nan_at, self.on_step = out, steps, lr, nan_at, on_step
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(4))
        self.opt = torch.optim.AdamW([self.w], lr=lr)
        self.target = torch.arange(4.0)

    def describe(self) -> dict:
        return {"params": {"lr": self.base_lr, "steps": self.steps}, "inputs": "toy"}

    def set_lr(self, step: int) -> float:
        lr = warmup_cosine(step, lr=self.base_lr, min_lr=0.0, warmup=2, total=self.steps)
        self.opt.param_groups[0]["lr"] = lr
        return lr

    def train_step(self, step: int) -> dict[str, float]:
        if self.on_step is not None:
            self.on_step(step)
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 4, generator=g) + 0.01 * torch.randn(8, 4)  # global RNG too: restored on resume
        if step == self.nan_at:
            x[0, 0] = float("nan")
        loss = ((x @ self.w - x @ self.target) ** 2).mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([self.w], 1e9)
        self.opt.step()
        self.opt.zero_grad()
        return {"loss": loss.item(), "grad_norm": grad_norm.item()}

    def state_dict(self) -> dict:
        return {"w": self.w.detach().clone(), "opt": self.opt.state_dict()}

    def load_state_dict(self, ck: dict) -> None:
        with torch.no_grad():
            self.w.copy_(ck["w"])
        self.opt.load_state_dict(ck["opt"])

    def export(self, state: LoopState) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save({"w": self.w.detach().clone(), "opt": self.opt.state_dict()}, self.out / "final.pt")
        write_history(self.out / "history.csv", state.history)


def _fit(tmp: Path, stop_at=None, **kw) -> bool:
    toy = Toy(tmp / "out", **kw)
    return fit(toy, Cadence(toy.steps, row_every=3, log_every=1, checkpoint_every=4), tmp / "state", NO_WANDB, stop_at)


def test_stopped_and_resumed_run_is_bit_identical(tmp_path):
    assert _fit(tmp_path / "a")
    assert not _fit(tmp_path / "b", stop_at=5)  # as a kill after step 5: the last checkpoint is step 4
    assert json.loads((tmp_path / "b" / "state" / "run.json").read_text())["inputs"] == "toy"
    assert _fit(tmp_path / "b")
    a, b = (torch.load(tmp_path / d / "out" / "final.pt", weights_only=True) for d in ("a", "b"))
    assert torch.equal(a["w"], b["w"]) and torch.equal(a["opt"]["state"][0]["exp_avg_sq"], b["opt"]["state"][0]["exp_avg_sq"])
    ha, hb = (pd.read_csv(tmp_path / d / "out" / "history.csv") for d in ("a", "b"))
    assert list(ha["step"]) == [3, 6, 9, 12]  # one row per 3 steps, none repeated after the resume
    pd.testing.assert_frame_equal(ha.drop(columns="seconds"), hb.drop(columns="seconds"), check_exact=True)


def test_other_settings_start_over(tmp_path):
    assert not _fit(tmp_path / "a", stop_at=5)
    assert _fit(tmp_path / "a", lr=0.05)  # another lr: the step-4 checkpoint is not resumed
    assert _fit(tmp_path / "fresh", lr=0.05)
    a, b = (torch.load(tmp_path / d / "out" / "final.pt", weights_only=True) for d in ("a", "fresh"))
    assert torch.equal(a["w"], b["w"])


@pytest.mark.parametrize("where", ["nan_batch", "huge_lr"])
def test_non_finite_values_stop_the_run_and_name_the_last_good_checkpoint(tmp_path, where):
    kw = {"nan_at": 6} if where == "nan_batch" else {"lr": 1e30}
    with pytest.raises(NonFiniteError) as e:
        _fit(tmp_path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("toy t: ")
    if where == "nan_batch":
        assert "at step 7" in msg and f"{tmp_path / 'state' / 'last.pt'} (step 4)" in msg
        ck = torch.load(tmp_path / "state" / "last.pt", weights_only=True)
        assert ck["step"] == 4 and torch.isfinite(ck["w"]).all()  # the good state was not overwritten
    assert not (tmp_path / "out").exists()  # nothing declared was written


def test_sigterm_writes_a_checkpoint_and_exits_so_that_a_retry_resumes(tmp_path):
    def term(step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted, match="SIGTERM at step 6"):
        _fit(tmp_path / "b", on_step=term)
    assert torch.load(tmp_path / "b" / "state" / "last.pt", weights_only=True)["step"] == 6
    assert not (tmp_path / "b" / "out").exists()
    assert _fit(tmp_path / "b") and _fit(tmp_path / "a")
    a, b = (torch.load(tmp_path / d / "out" / "final.pt", weights_only=True) for d in ("a", "b"))
    assert torch.equal(a["w"], b["w"])
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is removed after the run


def test_nbp_cli_reports_a_diverging_generator_in_one_line_and_writes_no_output(tmp_path, capsys, monkeypatch):
    """`lr=1e30, grad_clip=0` (the issue's reproduction) on tiny token shards: exit 1, one line, no generator.pt."""
    from test_generator_train import make_shards, settings

    from nbp.cli import main

    monkeypatch.setenv("NBP_PROGRESS", "0")
    make_shards(tmp_path)
    o = settings(tmp_path, steps=6, lr=1e30, grad_clip=0.0, checkpoint_every=2, val_every=2)
    args = ["train_generator", "embedded_nbp", "--params", str(REPO / "params.yaml")]
    for k, v in o.items():
        args += ["-S", f"{k}={json.dumps(v)}"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("nbp: error: train_generator embedded_nbp: loss") and "\n" not in err, err
    cfg = load_config(REPO / "params.yaml", o)
    assert not Path(dag.folder(cfg, "train_generator", "embedded_nbp")).exists()
    # it diverges at step 2, before the first checkpoint (every 2 steps): none is written, none is named
    assert "loss = nan at step 2" in err and err.endswith("last good rolling checkpoint: none (no checkpoint written yet)")
    assert not (dag.resolve(cfg, "train_generator", "embedded_nbp").state / "last.pt").exists()
