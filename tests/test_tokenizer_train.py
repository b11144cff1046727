"""Tokenizer training: loss pieces with known answers, one real step lowers the loss, GAN phase, bit-identical resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nbp.config import load_config
from nbp.tokenizer import load_tokenizer
from nbp.tokenizer.losses import LeCam, adaptive_weight, hinge_d_loss, hinge_g_loss
from nbp.tokenizer.model import VideoTokenizer
from nbp.tokenizer.train import DataOrder, model_config_for, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"


def make_clip_cache(root: Path, n_train: int = 8, n_val: int = 4, frames: int = 5, size: int = 16, seed: int = 0) -> Path:
    """A clip cache in the documented `prepare` format: moving coloured squares on black."""
    rng = np.random.default_rng(seed)
    classes = [{"label": 0, "name": "SquareSlide", "text": "square slide"}]
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps(classes))
    for split, n in (("train", n_train), ("val", n_val)):
        clips = np.zeros((n, frames, size, size, 3), dtype=np.uint8)
        for i in range(n):
            x0, y0, colour = rng.integers(0, size // 2), rng.integers(0, size // 2), rng.integers(80, 255, 3)
            for t in range(frames):
                x = (x0 + t) % (size - 5)
                clips[i, t, y0:y0 + 6, x:x + 6] = colour
        (root / split).mkdir(exist_ok=True)
        np.save(root / split / "clips.npy", clips)
        pd.DataFrame({"clip": range(n), "video": [f"v{i}" for i in range(n)], "label": 0, "class_name": "SquareSlide",
                      "class_text": "square slide", "fps": 8.0, "num_frames": frames, "start": 0}).to_csv(
            root / split / "manifest.csv", index=False)
    return root


TINY = {"channels": 8, "steps": 6, "batch_size": 4, "lr": 0.003, "warmup_steps": 1, "disc": "frame2d", "disc_channels": 8,
        "disc_layers": 2, "disc_start": 3, "lecam_weight": 0.1, "ema": 0.9, "checkpoint_every": 2, "log_every": 1,
        "hflip": True, "train_frames": None, "image_steps": 0, "recon_loss": "l1"}


def overrides(out: Path, **kw) -> dict:
    # 5 frames of 16x16 (latent grid 2x4x4, so the embedded generators' blocks become 1x1x1 to stay valid)
    o = {"run.out": str(out), "prepare.embedded.frames": 5, "prepare.embedded.resolution": 16,
         "train_generator.embedded_nbp.block": [1, 1, 1]}
    o.update({f"train_tokenizer.embedded.{k}": v for k, v in {**TINY, **kw}.items()})
    return o


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    """No W&B, no bars, one thread (tiny tensors; subprocesses inherit it): fast and the same on any machine load."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("NBP_PROGRESS", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------
# pieces with known answers


def test_data_order_visits_every_clip_once_per_epoch_and_is_a_function_of_the_counter():
    order = DataOrder(10, seed=3, hflip=True, max_start=4)
    idx, flip, t0 = order.indices(0, 25)
    assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:20]) == list(range(10))
    assert not np.array_equal(idx[:10], idx[10:20])  # a new permutation each epoch
    assert t0.min() >= 0 and t0.max() <= 4 and flip.any() and not flip.all()
    fresh = DataOrder(10, seed=3, hflip=True, max_start=4)  # a resumed run asks from the middle
    for a, b in zip(fresh.indices(13, 7), (idx[13:20], flip[13:20], t0[13:20])):
        assert np.array_equal(a, b)


def test_hinge_losses_and_adaptive_weight():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3 / 3))
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.6, 0.8])
    # d rec / dw = a (norm 5), d g / dw = b (norm 1) -> 5 / (1 + 1e-4)
    assert adaptive_weight((w * a).sum(), (w * b).sum(), w).item() == pytest.approx(5 / (1 + 1e-4))


def test_lecam_penalty_and_ema():
    lc = LeCam(decay=0.5)
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 1.0])
    # with both EMAs at 0: mean(relu(real - 0)^2) + mean(relu(0 - fake)^2) = (1 + 9) / 2 + (1 + 0) / 2
    assert lc(real, fake).item() == pytest.approx(5.5)
    lc.update(real, fake)
    assert lc.ema_real.item() == pytest.approx(1.0) and lc.ema_fake.item() == pytest.approx(0.0)


# --------------------------------------------------------------------------------------
# the training loop


def _l1_on(model, frames: np.ndarray) -> float:
    x = torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float() / 255
    with torch.no_grad():
        return float((model(x)[0] - x).abs().mean())


def test_one_real_training_step_decreases_the_loss_on_a_fixed_batch(tmp_path):
    frames = np.load(make_clip_cache(tmp_path / "out" / "prepare" / "embedded", n_train=4) / "train" / "clips.npy")
    cfg = load_config(PARAMS, overrides(tmp_path / "out", steps=1, disc="none", ema=0.0, hflip=False, lr=0.001,
                                        recon_loss="l1", image_steps=0))
    tcfg = cfg.train_tokenizer["embedded"]
    torch.manual_seed(tcfg.seed)
    before = _l1_on(VideoTokenizer(model_config_for(tcfg)), frames)  # the model the run starts from (same seed)
    train_tokenizer(cfg, "embedded", frames, torch.device("cpu"))
    out = tmp_path / "out" / "train_tokenizer" / "embedded"
    after = _l1_on(load_tokenizer(out / "tokenizer.pt"), frames)
    hist = pd.read_csv(out / "history.csv")
    assert hist["recon"].iloc[0] == pytest.approx(before, rel=1e-5)  # the logged loss is this batch's loss
    assert after < before
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["vocab_size"] == 1000 and metrics["latent_grid"] == [2, 4, 4]


def test_gan_phase_trains_the_discriminator_and_logs_its_losses(tmp_path):
    make_clip_cache(tmp_path / "out" / "prepare" / "embedded")
    from nbp.tokenizer.train import run_train_tokenizer

    cfg = load_config(PARAMS, overrides(tmp_path / "out", steps=4, disc_start=2, checkpoint_every=100))
    run_train_tokenizer(cfg, "embedded")
    hist = pd.read_csv(tmp_path / "out" / "train_tokenizer" / "embedded" / "history.csv")
    assert list(hist["step"]) == [1, 2, 3, 4]
    gan = hist[hist["step"] > 2]
    assert hist[hist["step"] <= 2]["d_loss"].isna().all()
    assert np.isfinite(gan[["d_loss", "g_loss", "d_weight"]].to_numpy()).all() and (gan["d_weight"] > 0).all()
    ck = torch.load(tmp_path / "out" / "checkpoints" / "train_tokenizer" / "embedded" / "last.pt", weights_only=True)
    assert ck["step"] == 4 and ck["opt_d"]["state"]  # the discriminator's optimizer took steps
    assert ck["lecam"]["ema_real"].item() != 0.0


def test_image_warm_up_trains_on_single_frames_then_on_clips(tmp_path, monkeypatch):
    frames = np.load(make_clip_cache(tmp_path / "out" / "prepare" / "embedded") / "train" / "clips.npy")
    cfg = load_config(PARAMS, overrides(tmp_path / "out", steps=4, image_steps=2, image_batch_size=6, disc="none",
                                        train_frames=None, checkpoint_every=100))
    seen = []
    forward = VideoTokenizer.forward
    monkeypatch.setattr(VideoTokenizer, "forward", lambda self, x: (seen.append(tuple(x.shape)), forward(self, x))[1])
    train_tokenizer(cfg, "embedded", frames, torch.device("cpu"))
    assert seen == [(6, 3, 1, 16, 16)] * 2 + [(4, 3, 5, 16, 16)] * 2
    ck = torch.load(tmp_path / "out" / "checkpoints" / "train_tokenizer" / "embedded" / "last.pt", weights_only=True)
    assert ck["data"]["samples"] == 2 * 6 + 2 * 4  # one sample counter across both phases


def test_discriminator_inside_the_image_warm_up_is_refused(tmp_path):
    from nbp.config import ConfigError

    frames = np.load(make_clip_cache(tmp_path / "out" / "prepare" / "embedded") / "train" / "clips.npy")
    cfg = load_config(PARAMS, overrides(tmp_path / "out", steps=4, image_steps=3, disc_start=2))
    with pytest.raises(ConfigError, match="disc_start"):
        train_tokenizer(cfg, "embedded", frames, torch.device("cpu"))


# --------------------------------------------------------------------------------------
# resume after a kill


def _cli(out: Path, **kw) -> list[str]:
    args = [sys.executable, "-m", "nbp", "train_tokenizer", "embedded", "--params", str(PARAMS)]
    for k, v in overrides(out, **kw).items():
        args += ["-S", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    return args


# SIGKILLs at six seeded points (inside checkpoint writes, right after a resume, in the export) with a bit-identical
# end: tests/test_kill_resume.py (it replaced the one timed kill that was here)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    """torchrun, 2 ranks (gloo) and 1 rank with the same global batch 4 (2 clips per rank): the same clips, the same
    averaged gradients."""
    env = dict(os.environ)
    kw = {"steps": 3, "disc": "none", "ema": 0.0, "checkpoint_every": 100}
    one, two = tmp_path / "one", tmp_path / "two"
    for out in (one, two):
        make_clip_cache(out / "prepare" / "embedded")
    subprocess.run(_cli(one, batch_size=4, **kw), check=True, env=env, cwd=REPO, capture_output=True)
    cmd = _cli(two, batch_size=4, **kw)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "-m"]
    subprocess.run(torchrun + cmd[2:], check=True, env=env, cwd=REPO, capture_output=True)
    a = torch.load(one / "train_tokenizer" / "embedded" / "tokenizer.pt", weights_only=True)["model"]
    b = torch.load(two / "train_tokenizer" / "embedded" / "tokenizer.pt", weights_only=True)["model"]
    ha = pd.read_csv(one / "train_tokenizer" / "embedded" / "history.csv")
    hb = pd.read_csv(two / "train_tokenizer" / "embedded" / "history.csv")
    for col in ("recon", "grad_norm"):  # the mean loss over all 4 clips and the all-reduced gradient's norm
        np.testing.assert_allclose(ha[col][:2], hb[col][:2], rtol=1e-5)
        np.testing.assert_allclose(ha[col], hb[col], rtol=2e-3)
    # weights: AdamW's first steps move every element by about +-lr whatever its gradient's size, so float noise in
    # near-zero gradients shows up element-wise; compare whole tensors' distance relative to the distance travelled
    torch.manual_seed(0)
    init = VideoTokenizer(model_config_for(load_config(PARAMS, overrides(one, **kw)).train_tokenizer["embedded"])).state_dict()
    diff = sum((a[k] - b[k]).pow(2).sum() for k in a).sqrt()
    travelled = sum((a[k] - init[k]).pow(2).sum() for k in a).sqrt()
    assert travelled > 0.1 and diff / travelled < 0.05, (float(diff), float(travelled))
    assert json.loads((two / "train_tokenizer" / "embedded" / "metrics.json").read_text())["world_size"] == 2
