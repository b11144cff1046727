"""Generator training: loss, optimizer groups, schedule, batch order, resume bit-identity, DDP and DeepSpeed."""

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
from nbp.generator import load_generator
from nbp.generator.data import BatchOrder, TokenShards, write_split
from nbp.generator.layout import IGNORE, BlockLayout, TaskLayout
from nbp.generator.model import GPT, GPTConfig, gpt_config, grid_position_code
from nbp.generator.train import init_grid_positions, next_block_loss, param_groups, run_train_generator

REPO = Path(__file__).resolve().parents[1]
GRID, VOCAB, CLASSES = (2, 4, 8), 64, 4


def make_shards(root: Path, n_train=48, n_val=16, noise=0.2, seed=0):
    """Token shards in the tokenize format: each class is a fixed pattern plus random tokens (learnable)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, VOCAB, size=(CLASSES, *GRID))
    classes = [{"label": i, "name": f"Shape{i}", "text": f"shape {i}"} for i in range(CLASSES)]
    for split, n in (("train", n_train), ("val", n_val)):
        labels = np.arange(n) % CLASSES
        codes = base[labels].copy()
        flip = rng.random(codes.shape) < noise
        codes[flip] = rng.integers(0, VOCAB, size=int(flip.sum()))
        write_split(root / "tokenize" / "embedded" / split, codes.astype(np.int16), pd.DataFrame(
            {"clip": np.arange(n), "video": np.arange(n) // 2, "label": labels, "class_text": [f"shape {i}" for i in labels]}))
    (root / "tokenize" / "embedded" / "meta.json").write_text(json.dumps(
        {"grid": list(GRID), "vocab_size": VOCAB, "classes": classes, "tokenizer": "tok.pt", "fps": 8, "frames": 5}))


def settings(out: Path, **kw) -> dict:
    base = {"steps": 6, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "dropout": 0.1, "cond_dropout": 0.2, "val_every": 3,
            "checkpoint_every": 2, "log_every": 1, "block": [1, 1, 8], "task": "class", "preset": "tiny", "strategy": "ddp"}
    base.update(kw)
    o = {f"train_generator.embedded_nbp.{k}": v for k, v in base.items()}
    o.update({"run.out": str(out), "run.device": "cpu", "run.wandb.mode": "disabled"})
    return o


def cli_args(o: dict) -> list[str]:
    return [a for k, v in o.items() for a in ("-S", f"{k}={json.dumps(v)}")]


def trained(out: Path):
    return torch.load(out / "train_generator" / "embedded_nbp" / "generator.pt", weights_only=True)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("NBP_PROGRESS", "0")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and immune to a busy machine
    yield
    torch.set_num_threads(threads)


def test_loss_only_on_video_tokens():
    V = 11
    logits = torch.randn(2, 5, V)
    tgt = torch.tensor([[IGNORE, 3, 4, 5, 6], [IGNORE, 1, 2, 3, 4]])
    loss, stats = next_block_loss(logits, tgt)
    ref = torch.nn.functional.cross_entropy(logits[:, 1:].reshape(-1, V), tgt[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref)
    changed = logits.clone()
    changed[:, 0] = 100 * torch.randn(2, V)  # the condition position does not count
    torch.testing.assert_close(next_block_loss(changed, tgt)[0], loss)
    perfect = torch.nn.functional.one_hot(tgt.clamp(min=0), V).float() * 10
    assert next_block_loss(perfect, tgt)[1]["acc1"] == 1.0


def test_weight_decay_on_linear_weights_only():
    m = GPT(gpt_config("tiny", vocab_size=20, n_positions=8, cond_len=1))
    decay, no_decay = param_groups(m, 0.01)
    names = {id(p): n for n, p in m.named_parameters()}
    dn = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert "blocks.0.attn.key.weight" in dn and "blocks.0.mlp.2.weight" in dn and "head.weight" in dn
    assert not any(n.endswith("bias") or "ln" in n or "emb" in n for n in dn)
    assert len(dn) + len(no_decay["params"]) == len(list(m.parameters()))


def test_grid_position_init():
    task = TaskLayout("class", BlockLayout(GRID, (1, 1, 8)), video_vocab=VOCAB, num_classes=CLASSES)
    m = GPT(gpt_config("tiny", vocab_size=task.vocab_size, n_positions=task.seq_len, cond_len=1))
    before = m.pos_emb.detach().clone()
    init_grid_positions(m, task, 0.1)
    # position 1 + j predicts raster cell j (1x1x8 blocks keep raster order); the class position is untouched
    cells = torch.tensor([[t, h, w] for t in range(GRID[0]) for h in range(GRID[1]) for w in range(GRID[2])])
    torch.testing.assert_close(m.pos_emb[0, 1:], 0.1 * grid_position_code(cells, GRID, 128))
    assert torch.equal(m.pos_emb[0, 0], before[0, 0]) and m.pos_emb.requires_grad


def test_batch_order_epochs_and_ranks():
    order = BatchOrder(10, 4, seed=3)
    seen = torch.cat([order.global_indices(s) for s in range(5)])  # 20 = two epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    g = order.global_indices(7)
    parts = [mb for r in range(2) for mb in order.micro_batches(7, rank=r, world=2, accum=2)]
    assert torch.equal(torch.cat(parts), g) and all(len(p) == 1 for p in parts)


def test_token_shards_read_back(tmp_path):
    make_shards(tmp_path)
    d = TokenShards(tmp_path / "tokenize" / "embedded", "val")
    assert len(d) == 16 and d.grid == GRID and d.tokens.dtype == np.int16
    codes, labels = d.batch(torch.tensor([5, 1]))
    assert codes.dtype == torch.long and labels.tolist() == [1, 1]
    assert torch.equal(codes[1], d[1][0])


def test_training_lowers_validation_loss(tmp_path):
    make_shards(tmp_path)
    cfg = load_config(REPO / "params.yaml", settings(tmp_path, steps=30, val_every=10, dropout=0.0, cond_dropout=0.0,
                                                      checkpoint_every=30))
    run_train_generator(cfg, "embedded_nbp")
    out = tmp_path / "train_generator" / "embedded_nbp"
    hist = pd.read_csv(out / "history.csv")
    assert list(hist.step) == [10, 20, 30]
    assert hist.val_loss.iloc[-1] < hist.val_loss.iloc[0] - 0.5
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_loss"] == pytest.approx(hist.val_loss.iloc[-1]) and metrics["tokens_per_s"] > 0
    gen = load_generator(out / "generator.pt")
    assert gen.task.task == "class" and gen.task.layout.block == (1, 1, 8) and len(gen.classes) == CLASSES
    assert not gen.model.training


def test_resume_after_kill_is_bit_identical(tmp_path):
    """Stop after step 5 (checkpoint at 4), rerun: same weights and history as an uninterrupted run."""
    for d in ("a", "b"):
        make_shards(tmp_path / d)
    cfg_a = load_config(REPO / "params.yaml", settings(tmp_path / "a"))
    run_train_generator(cfg_a, "embedded_nbp")
    cfg_b = load_config(REPO / "params.yaml", settings(tmp_path / "b"))
    run_train_generator(cfg_b, "embedded_nbp", stop_at=5)
    assert not (tmp_path / "b" / "train_generator" / "embedded_nbp").exists()  # no half output
    last = torch.load(tmp_path / "b" / "checkpoints" / "train_generator" / "embedded_nbp" / "last.pt", weights_only=True)
    assert last["state"]["step"] == 4
    run_train_generator(cfg_b, "embedded_nbp")
    a, b = trained(tmp_path / "a"), trained(tmp_path / "b")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ha = pd.read_csv(tmp_path / "a" / "train_generator" / "embedded_nbp" / "history.csv")
    hb = pd.read_csv(tmp_path / "b" / "train_generator" / "embedded_nbp" / "history.csv")
    pd.testing.assert_frame_equal(ha.drop(columns="tokens_per_s"), hb.drop(columns="tokens_per_s"), check_exact=True)


@pytest.mark.parametrize("change", ["block", "tokens"])
def test_rolling_checkpoint_of_other_settings_or_tokens_starts_over(tmp_path, change):
    """A killed run's rolling checkpoint is not resumed once the settings or the token shards changed:
    the rerun equals a fresh run on the new settings/tokens (what DVC/Snakemake expect after an upstream change)."""
    new = {"block": [1, 1, 4]} if change == "block" else {}
    make_shards(tmp_path / "a")
    make_shards(tmp_path / "b", seed=1 if change == "tokens" else 0)
    run_train_generator(load_config(REPO / "params.yaml", settings(tmp_path / "a")), "embedded_nbp", stop_at=3)
    if change == "tokens":
        make_shards(tmp_path / "a", seed=1)
    run_train_generator(load_config(REPO / "params.yaml", settings(tmp_path / "a", **new)), "embedded_nbp")
    run_train_generator(load_config(REPO / "params.yaml", settings(tmp_path / "b", **new)), "embedded_nbp")
    wa, wb = trained(tmp_path / "a")["model"], trained(tmp_path / "b")["model"]
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _cli(args: list[str], env_extra: dict, cwd: Path, launcher: list[str] | None = None):
    env = {**os.environ, "NBP_PROGRESS": "0", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **env_extra}
    cmd = (launcher or [sys.executable]) + ["-m", "nbp", "train_generator", "embedded_nbp", "--params", str(REPO / "params.yaml")]
    cmd += args
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.slow
def test_ddp_two_processes_equal_one(tmp_path):
    """torchrun with 2 CPU processes (gloo) and the same global batch gives the 1-process result."""
    kw = dict(steps=3, dropout=0.0, cond_dropout=0.0, grad_accum=2, checkpoint_every=3)
    for d in ("one", "two"):
        make_shards(tmp_path / d)
    run_train_generator(load_config(REPO / "params.yaml", settings(tmp_path / "one", **kw)), "embedded_nbp")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _cli(cli_args(settings(tmp_path / "two", batch_size=8, **{k: v for k, v in kw.items()})), {}, tmp_path, launcher)
    one, two = trained(tmp_path / "one"), trained(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "train_generator" / "embedded_nbp" / "metrics.json").read_text())["world_size"] == 2
    torch.manual_seed(0)  # the trainer's initialisation (seed 0, rank 0)
    init = GPT(GPTConfig(**one["config"])).state_dict()
    for k in one["model"]:
        # Adam turns float-rounding differences of near-zero gradients into differences up to ~lr: tolerance 1e-4
        torch.testing.assert_close(two["model"][k], one["model"][k], atol=1e-4, rtol=1e-4)
        if not k.endswith("attn.key.bias"):  # softmax ignores a key bias: its gradient is rounding noise, which Adam scales up
            assert (two["model"][k] - one["model"][k]).abs().mean() < 1e-6
    assert (one["model"]["head.weight"] - init["head.weight"]).abs().max() > 5e-3  # the steps moved the weights


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_zero_step_on_cpu(tmp_path, stage):
    """A DeepSpeed ZeRO run (gloo on CPU, fp32) matches plain training; its shards export to fp32 via zero_to_fp32
    (the frozen unconditional embedding included)."""
    kw = dict(steps=2, dropout=0.0, cond_dropout=0.0, checkpoint_every=2)
    for d in ("plain", "zero"):
        make_shards(tmp_path / d)
    run_train_generator(load_config(REPO / "params.yaml", settings(tmp_path / "plain", **kw)), "embedded_nbp")
    _cli(cli_args(settings(tmp_path / "zero", strategy=f"deepspeed_{stage}", **kw)), {}, tmp_path)
    assert (tmp_path / "zero" / "checkpoints" / "train_generator" / "embedded_nbp" / "deepspeed" / "step2").is_dir()
    plain, zero2 = trained(tmp_path / "plain"), trained(tmp_path / "zero")
    assert set(zero2["model"]) == set(plain["model"])
    for k in plain["model"]:
        assert zero2["model"][k].dtype == torch.float32
        torch.testing.assert_close(zero2["model"][k], plain["model"][k], atol=2e-5, rtol=1e-4)
    gen = load_generator(tmp_path / "zero" / "train_generator" / "embedded_nbp" / "generator.pt")
    assert gen.model.head.weight.shape[0] == gen.task.vocab_size


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_cuda_bf16_flex(tmp_path):
    make_shards(tmp_path)
    o = settings(tmp_path, steps=30, val_every=10, dropout=0.0, cond_dropout=0.2, checkpoint_every=10, flex_attention=True,
                 bf16=True)
    o["run.device"] = "cuda"
    run_train_generator(load_config(REPO / "params.yaml", o), "embedded_nbp", stop_at=15)
    run_train_generator(load_config(REPO / "params.yaml", o), "embedded_nbp")  # resumes at 10 (CUDA RNG restored)
    hist = pd.read_csv(tmp_path / "train_generator" / "embedded_nbp" / "history.csv")
    assert list(hist.step) == [10, 20, 30] and hist.val_loss.iloc[-1] < hist.val_loss.iloc[0] - 0.5
    assert "cuda" in json.loads((tmp_path / "train_generator" / "embedded_nbp" / "metrics.json").read_text())["device"]
