"""real_stats, eval_tokenizer, tokenize and eval_generator under torchrun (2 gloo processes on CPU) give what one
process gives: the same metrics, byte-identical token shards and sample grids, nothing written by rank 1.

One upstream set (tiny clip cache, random small tokenizer, two random tiny generators, random LPIPS weights, a
stand-in feature network for the I3D) is run through the four stages once with `python` and once with `torchrun
--nproc_per_node 2`, each process on 1 thread. The sizes are odd so the ranks' shares differ:

- eval_tokenizer: 5 val clips in batches of 2 -> rank 0 one batch, rank 1 two (grid clips 0 | 2, 4);
- tokenize: 7 train clips and 5 val clips in batches of 2;
- eval_generator ``embedded_nbp`` (class): 7 videos in batches of 2, seeds 0, 1, 2 -> 12 (seed, batch) units, seed 1
  split between the ranks; ``embedded_ntp`` (frame prediction, untrained baseline): 5 videos, one seed, the grid's
  3 videos from both ranks.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nbp.checkpoint import save_checkpoint
from nbp.data.video_io import read_video
from nbp.generator import FORMAT
from nbp.generator.layout import BlockLayout, TaskLayout
from nbp.generator.model import GPT, GPTConfig
from nbp.metrics.detector import I3D_FILENAME
from nbp.metrics.image import VGG16_CONVS
from nbp.tokenizer import tokenizer_checkpoint
from nbp.tokenizer.model import PRESETS, VideoTokenizer

REPO = Path(__file__).resolve().parents[1]
RES, FRAMES, CLASSES = 16, 17, 3
GRID = (5, 4, 4)  # the small tokenizer: 17 x 16 x 16 -> 5 x 4 x 4
TIMING = ("seconds", "per_second", "fps", "device")  # keys that hold a measured time or the hardware

RUNNER = textwrap.dedent("""
    # The nbp CLI with a cheap deterministic stand-in for the I3D (its own distributed test: test_metrics_distributed).
    import json, sys
    import torch, torch.nn as nn, torch.nn.functional as F
    import nbp.metrics.fvd as fvd
    import nbp.metrics.real_stats as real_stats
    from nbp.cli import main

    class StandIn(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.proj = nn.Linear(24, 6)
            nn.init.normal_(self.proj.weight)

        def forward(self, x, return_features=False):  # [B, 3, T, H, W] -> [B, 6]
            return self.proj(F.adaptive_avg_pool3d(x, (2, 2, 2)).flatten(1))

    model = StandIn()
    fvd.get_i3d = real_stats.get_i3d = lambda weights=None, device="cpu": model
    params, overrides, *stages = sys.argv[1:]
    flags = [a for k, v in json.loads(overrides).items() for a in ("-S", f"{k}={json.dumps(v)}")]
    for stage in stages:
        rc = main([*stage.split(":"), "--params", params, *flags])
        if rc:
            sys.exit(rc)
""")
STAGES = ["real_stats:embedded", "eval_tokenizer:embedded", "tokenize:embedded", "eval_generator:embedded_nbp",
          "eval_generator:embedded_ntp"]


def _clips(n: int, seed: int) -> np.ndarray:
    """uint8 [n, T, H, W, 3]: random colour fields drifting in time."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (n, 1, RES, RES, 3))
    drift = np.arange(FRAMES)[None, :, None, None, None] * rng.integers(1, 8, (n, 1, 1, 1, 1))
    return ((base + drift) % 256).astype(np.uint8)


def _write_split(prep: Path, split: str, n: int, per_video: int, seed: int) -> None:
    (prep / split).mkdir(parents=True)
    np.save(prep / split / "clips.npy", _clips(n, seed))
    labels = (np.arange(n) // per_video) % CLASSES
    pd.DataFrame({"clip": range(n), "video": [f"v{i // per_video}" for i in range(n)], "label": labels,
                  "class_name": [f"Class{k}" for k in labels], "class_text": [f"class {k}" for k in labels],
                  "fps": 8.0, "num_frames": 40, "start": 0}).to_csv(prep / split / "manifest.csv", index=False)


def _generator(path: Path, task: TaskLayout, classes: list, seed: int) -> None:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=task.vocab_size, n_positions=128, n_layer=1, n_head=2, n_embd=32, cond_len=task.cond_len))
    save_checkpoint(path, {"format": FORMAT, "version": 1, "config": model.config.to_dict(), "model": model.state_dict(),
                           "task": task.describe(), "classes": classes, "tokenizer": None, "step": 0})


def _lpips_weights(folder: Path) -> dict:
    """Random weights in the two documented LPIPS formats; -> the environment that points at them."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    vgg = {}
    for i, cin, cout in VGG16_CONVS:
        vgg[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * math.sqrt(2 / (9 * cin))
        vgg[f"features.{i}.bias"] = torch.zeros(cout)
    lin = {f"lin{j}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for j, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, folder / "vgg16.pth")
    torch.save(lin, folder / "vgg.pth")
    return {"NBP_LPIPS_VGG": str(folder / "vgg16.pth"), "NBP_LPIPS_LIN": str(folder / "vgg.pth")}


def build_upstream(out: Path) -> None:
    """The inputs of the four stages under ``out`` (a run.out): clip cache, tokenizer, generators, detector file."""
    prep = out / "prepare" / "embedded"
    _write_split(prep, "train", 14, per_video=2, seed=0)  # 7 videos x 2 clips; tokenize keeps the first of each
    _write_split(prep, "val", 5, per_video=1, seed=1)
    classes = [{"label": k, "name": f"Class{k}", "text": f"class {k}"} for k in range(CLASSES)]
    (prep / "classes.json").write_text(json.dumps(classes))
    torch.manual_seed(0)
    tok = VideoTokenizer(PRESETS["small"]).eval()
    save_checkpoint(out / "train_tokenizer" / "embedded" / "tokenizer.pt", tokenizer_checkpoint(tok))
    nbp = TaskLayout("class", BlockLayout(GRID, (1, 1, 2)), tok.vocab_size, num_classes=CLASSES)
    _generator(out / "train_generator" / "embedded_nbp" / "generator.pt", nbp, classes, seed=1)
    pred = TaskLayout("frame_pred", BlockLayout(GRID, (1, 1, 1)), tok.vocab_size, context_frames=2)
    _generator(out / "train_generator" / "embedded_ntp" / "generator.pt", pred, classes, seed=2)
    (out / "fetch_detector").mkdir(parents=True)
    (out / "fetch_detector" / I3D_FILENAME).write_bytes(b"stand-in")


def overrides(out: Path) -> dict:
    o = {"run.out": str(out), "run.device": "cpu", "prepare.embedded.resolution": RES, "prepare.embedded.frames": FRAMES,
         "real_stats.embedded.resolution": RES, "real_stats.embedded.num_videos": 7, "real_stats.embedded.batch_size": 2,
         "eval_tokenizer.embedded.num_videos": 5, "eval_tokenizer.embedded.batch_size": 2,
         "eval_tokenizer.embedded.grid_videos": 3, "tokenize.embedded.batch_size": 2,
         "tokenize.embedded.train_clips_per_video": 1,
         "train_generator.embedded_nbp.block": [1, 1, 2], "train_generator.embedded_ntp.task": "frame_pred",
         "train_generator.embedded_ntp.context_frames": 2}
    gen = {"num_videos": 7, "batch_size": 2, "seeds": [0, 1, 2], "grid_videos": 3, "top_k": 50, "top_p": None,
           "untrained_baseline": False}
    o.update({f"eval_generator.embedded_nbp.{k}": v for k, v in gen.items()})
    ntp = {**gen, "num_videos": 5, "seeds": [0], "untrained_baseline": True}
    o.update({f"eval_generator.embedded_ntp.{k}": v for k, v in ntp.items()})
    return o


def run_stages(out: Path, env: dict, world: int, stages: list[str] = STAGES) -> subprocess.CompletedProcess:
    """The stages on ``out`` with ``world`` processes (1: plain python; 2: torchrun --standalone)."""
    script = out.parent / "runner.py"
    script.write_text(RUNNER)
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
                                 if world > 1 else [])
    cmd = [*launch, str(script), str(REPO / "params.yaml"), json.dumps(overrides(out)), *stages]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=out.parent)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """-> (one process's run.out, two processes' run.out)."""
    root = tmp_path_factory.mktemp("sharded")
    env = {**os.environ, **_lpips_weights(root / "lpips"), "OMP_NUM_THREADS": "1", "NBP_PROGRESS": "0",
           "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    outs = []
    for world in (1, 2):
        out = root / f"world{world}" / "out"
        build_upstream(out)
        res = run_stages(out, env, world)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        outs.append(out)
    return outs


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING) and k != "world_size"}


def _same_metrics(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float):
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=0), k
        elif isinstance(a[k], list) and a[k] and isinstance(a[k][0], float):
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=0), k
        else:
            assert b[k] == a[k], k


def _same_frames(a: Path, b: Path) -> None:
    """Two h264 grids of the same clips. Their bytes are not always reproducible even from one process (seen: the
    right-most pixel column of a frame-prediction grid, in two runs of the same code), so compare decoded frames."""
    va, vb = read_video(a), read_video(b)
    assert va.shape == vb.shape and np.abs(va.astype(int) - vb).mean() < 0.5


def _metrics(out: Path, stage: str, entry: str, name: str = "metrics.json") -> dict:
    return json.loads((out / stage / entry / name).read_text().replace(str(out), "<run.out>"))


@pytest.mark.slow
def test_eval_tokenizer_two_ranks_equal_one(runs):
    one, two = runs
    a, b = _metrics(one, "eval_tokenizer", "embedded"), _metrics(two, "eval_tokenizer", "embedded")
    assert b["world_size"] == 2 and "world_size" not in a
    assert a["lpips"] is not None and a["num_videos"] == 5 and a["rfvd"] > 0 and 0 < a["ssim"] < 1
    _same_metrics(_untimed(a), _untimed(b))
    fa, fb = _files(one / "eval_tokenizer" / "embedded"), _files(two / "eval_tokenizer" / "embedded")
    assert sorted(fa) == sorted(fb) == ["metrics.json", "recon.gif", "recon.mp4"]
    assert fa["recon.gif"] == fb["recon.gif"]  # grid clips 0 (rank 0), 2 and 4 (rank 1), in order
    _same_frames(one / "eval_tokenizer" / "embedded" / "recon.mp4", two / "eval_tokenizer" / "embedded" / "recon.mp4")


@pytest.mark.slow
def test_tokenize_two_ranks_write_byte_identical_shards(runs):
    one, two = runs
    fa, fb = _files(one / "tokenize" / "embedded"), _files(two / "tokenize" / "embedded")
    assert sorted(fa) == sorted(fb)
    shards = [k for k in fa if k != "meta.json"]
    assert {"train/tokens.npy", "val/tokens.npy", "train/manifest.csv", "val/manifest.csv"} <= set(shards)
    for k in shards:
        assert fa[k] == fb[k], k
    tokens = np.load(two / "tokenize" / "embedded" / "train" / "tokens.npy")
    assert tokens.shape == (7, *GRID) and len(np.unique(tokens)) > 1  # one clip of each of the 7 videos, real codes
    ma, mb = _metrics(one, "tokenize", "embedded", "meta.json"), _metrics(two, "tokenize", "embedded", "meta.json")
    assert mb.pop("world_size") == 2 and ma["clips"] == {"train": 7, "val": 5}
    assert _untimed(ma) == _untimed(mb)


@pytest.mark.slow
def test_real_stats_two_ranks_equal_one(runs):
    one, two = runs
    for f in ("stats.npz", "features.npy"):
        assert (one / "real_stats" / "embedded" / f).read_bytes() == (two / "real_stats" / "embedded" / f).read_bytes()
    assert _metrics(two, "real_stats", "embedded", "meta.json")["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["embedded_nbp", "embedded_ntp"])
def test_eval_generator_two_ranks_equal_one(runs, entry):
    """The same gFVD per seed (and untrained baseline), the same sample grid: each batch's samples depend only on
    (seed, batch), not on the rank that made them."""
    one, two = runs
    a, b = _metrics(one, "eval_generator", entry), _metrics(two, "eval_generator", entry)
    assert b["world_size"] == 2
    assert len(set(a["gfvd_per_seed"])) == len(a["seeds"])  # different seeds, different samples
    if entry == "embedded_ntp":
        assert a["task"] == "frame_pred" and a["gfvd_untrained"] is not None
    _same_metrics(_untimed(a), _untimed(b))
    fa, fb = _files(one / "eval_generator" / entry), _files(two / "eval_generator" / entry)
    assert sorted(fa) == sorted(fb) == ["metrics.json", "samples.gif", "samples.mp4"]
    assert fa["samples.gif"] == fb["samples.gif"]  # lossless: the same clips in the same places
    _same_frames(one / "eval_generator" / entry / "samples.mp4", two / "eval_generator" / entry / "samples.mp4")


@pytest.mark.slow
def test_nothing_but_the_declared_outputs_is_written(runs):
    """Rank 1 writes nothing of its own: the two runs leave the same files (no temporary folders)."""
    one, two = runs
    assert sorted(_files(one)) == sorted(_files(two))


def test_shares_are_disjoint_contiguous_and_cover_every_unit():
    from nbp.distributed import DistInfo, share

    for n in (0, 1, 3, 7, 12):
        for world in (1, 2, 3, 5):
            parts = [share(n, DistInfo(rank=r, world_size=world)) for r in range(world)]
            assert [u for p in parts for u in p] == list(range(n)), (n, world)  # in order, each unit once
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [len(share(3, DistInfo(rank=r, world_size=2))) for r in range(2)] == [1, 2]


def test_batch_randomness_depends_on_seed_and_batch_only():
    from nbp.generator.evaluate import batch_generator

    def draw(seed, batch):
        return torch.rand(4, generator=batch_generator(seed, batch, torch.device("cpu")))

    assert torch.equal(draw(3, 5), draw(3, 5))
    others = [draw(3, 4), draw(4, 5), draw(5, 3)]
    assert all(not torch.equal(draw(3, 5), o) for o in others)


GATHER = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from nbp.distributed import cleanup_distributed, gather_rows, init_distributed, sum_over_ranks

    info = init_distributed(torch.device("cpu"))
    r = info.rank
    clips = np.full((2 - r, 3, 2, 2, 3), 10 + r, np.uint8)  # rank 0: 2 rows, rank 1: 1
    codes = np.arange(6, dtype=np.int16).reshape(3, 2) + 100 * r if r else np.empty(0, np.int16)  # rank 0: none
    feats = np.random.default_rng(r).normal(size=(r + 1, 4)).astype(np.float32)
    got = [gather_rows(a, info) for a in (clips, codes, feats)]
    total = sum_over_ranks(np.array([r + 1, 2 * r], dtype=np.int64), info)
    if r == 0:
        np.savez(sys.argv[1], clips=got[0], codes=got[1], feats=got[2], total=total)
    cleanup_distributed()  # as nbp's stages do at exit: a gloo group left open can abort the process at exit
""")


@pytest.mark.slow
def test_gather_rows_keeps_rank_order_dtypes_and_empty_ranks(tmp_path):
    (tmp_path / "gather.py").write_text(GATHER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(tmp_path / "gather.py"), str(tmp_path / "out.npz")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    assert got["clips"].dtype == np.uint8 and got["clips"].shape == (3, 3, 2, 2, 3)
    assert got["clips"][:, 0, 0, 0, 0].tolist() == [10, 10, 11]
    assert got["codes"].dtype == np.int16 and got["codes"].tolist() == [[100, 101], [102, 103], [104, 105]]
    expect = np.concatenate([np.random.default_rng(r).normal(size=(r + 1, 4)).astype(np.float32) for r in range(2)])
    assert got["feats"].dtype == np.float32 and got["feats"].tobytes() == expect.tobytes()
    assert got["total"].tolist() == [3, 2]


def test_eval_tokenizer_names_num_videos_when_it_is_below_two(tmp_path):
    from nbp.config import ConfigError, load_config
    from nbp.tokenizer.evaluate import run_eval_tokenizer

    build_upstream(tmp_path / "out")
    cfg = load_config(REPO / "params.yaml", {**overrides(tmp_path / "out"), "eval_tokenizer.embedded.num_videos": 1})
    with pytest.raises(ConfigError, match=r"eval_tokenizer\.embedded\.num_videos: 1: rFVD needs at least 2"):
        run_eval_tokenizer(cfg, "embedded")
    assert not (tmp_path / "out" / "eval_tokenizer").exists()


@pytest.mark.slow
def test_same_seed_same_metrics_other_seed_other_samples(runs, tmp_path):
    """Issue 13 item 8: a second one-process run with the same seed gives the same metrics JSON, key for key and
    value for value, except the keys that hold a measured time or the hardware (TIMING), and byte-identical sample
    grids; another ``run.seed`` (other labels drawn) with other eval seeds gives other samples and other gFVDs."""
    one, _ = runs
    env = {**os.environ, **_lpips_weights(tmp_path / "lpips"), "OMP_NUM_THREADS": "1", "NBP_PROGRESS": "0",
           "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    stages = ["eval_tokenizer:embedded", "eval_generator:embedded_nbp"]
    again, other = tmp_path / "again" / "out", tmp_path / "other" / "out"
    for out in (again, other):
        build_upstream(out)
        (out / "real_stats").mkdir()
        os.symlink(one / "real_stats" / "embedded", out / "real_stats" / "embedded")
    assert run_stages(again, env, 1, stages).returncode == 0
    for stage, entry in (("eval_tokenizer", "embedded"), ("eval_generator", "embedded_nbp")):
        a, b = _metrics(one, stage, entry), _metrics(again, stage, entry)
        assert json.dumps(_untimed(a), sort_keys=True) == json.dumps(_untimed(b), sort_keys=True), stage
        assert set(a) - set(_untimed(a)) == set(b) - set(_untimed(b)) and len(_untimed(a)) > 10
        gif = {"eval_tokenizer": "recon.gif", "eval_generator": "samples.gif"}[stage]
        assert (one / stage / entry / gif).read_bytes() == (again / stage / entry / gif).read_bytes(), stage

    script = other.parent / "runner.py"
    script.write_text(RUNNER)
    o = {**overrides(other), "run.seed": 7, "eval_generator.embedded_nbp.seeds": [3, 4, 5]}
    res = subprocess.run([sys.executable, str(script), str(REPO / "params.yaml"), json.dumps(o), "eval_generator:embedded_nbp"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=other.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    a, c = _metrics(one, "eval_generator", "embedded_nbp"), _metrics(other, "eval_generator", "embedded_nbp")
    assert not set(a["gfvd_per_seed"]) & set(c["gfvd_per_seed"])
    assert (one / "eval_generator" / "embedded_nbp" / "samples.gif").read_bytes() != \
        (other / "eval_generator" / "embedded_nbp" / "samples.gif").read_bytes()
