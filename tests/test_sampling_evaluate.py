"""eval_generator and `nbp sample` on made-up upstream outputs (tiny tokenizer, tiny generator, a stand-in feature
network in place of the I3D): the gFVD of each seed is the Fréchet distance of the videos that seed generates,
frame prediction conditions on the encoded first frames, the sample grids hold what metrics.json says."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nbp.checkpoint import save_checkpoint
from nbp.config import load_config
from nbp.data.clips import ClipCache
from nbp.data.video_io import read_video, write_video
from nbp.generator import FORMAT, load_generator
from nbp.generator.evaluate import Timer, draw_labels, generate_videos, run_eval_generator
from nbp.generator.layout import BlockLayout, TaskLayout
from nbp.generator.model import GPT, GPTConfig
from nbp.generator.sampling import prompt_ids
from nbp.metrics import fvd
from nbp.metrics.detector import I3D_FILENAME
from nbp.tokenizer import load_tokenizer, tokenizer_checkpoint
from nbp.tokenizer.model import PRESETS, VideoTokenizer

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
RES, FRAMES, CLASSES = 8, 17, 3
GRID = (5, 2, 2)  # small tokenizer: 17 x 8 x 8 -> 5 x 2 x 2 (spatial factor 4); blocks of 2 tokens


class StandIn(nn.Module):
    """A cheap deterministic feature network with the I3D's call signature."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(24, 6)
        torch.manual_seed(0)
        nn.init.normal_(self.proj.weight)

    def forward(self, x, return_features=False):
        return self.proj(F.adaptive_avg_pool3d(x, (2, 2, 2)).flatten(1))


def _clips(n, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (n, 1, RES, RES, 3))
    drift = np.arange(FRAMES)[None, :, None, None, None] * rng.integers(1, 8, (n, 1, 1, 1, 1))
    return ((base + drift) % 256).astype(np.uint8)  # [n, T, H, W, 3]


def _write_upstream(out: Path, task_name: str):
    prep = out / "prepare" / "embedded"
    (prep / "train").mkdir(parents=True)
    n = 12
    np.save(prep / "train" / "clips.npy", _clips(n))
    labels = np.arange(n) % CLASSES
    names = [f"Class{k}" for k in range(CLASSES)]
    pd.DataFrame({"clip": range(n), "video": [f"v{i}" for i in range(n)], "label": labels,
                  "class_name": [names[k] for k in labels], "class_text": [names[k].lower() for k in labels],
                  "fps": 8.0, "num_frames": 40, "start": 0}).to_csv(prep / "train" / "manifest.csv", index=False)
    classes = [{"label": k, "name": names[k], "text": names[k].lower()} for k in range(CLASSES)]
    (prep / "classes.json").write_text(json.dumps(classes))
    torch.manual_seed(0)
    tok = VideoTokenizer(PRESETS["small"]).eval()
    save_checkpoint(out / "train_tokenizer" / "embedded" / "tokenizer.pt", tokenizer_checkpoint(tok))
    layout = BlockLayout(GRID, (1, 1, 2))
    task = TaskLayout(task_name, layout, tok.vocab_size, num_classes=CLASSES if task_name == "class" else 0,
                      context_frames=2 if task_name == "frame_pred" else 0)
    torch.manual_seed(0)  # = run.seed: eval's untrained baseline initialises this very model
    model = GPT(GPTConfig(vocab_size=task.vocab_size, n_positions=128, n_layer=1, n_head=2, n_embd=32, cond_len=task.cond_len))
    save_checkpoint(out / "train_generator" / "embedded_nbp" / "generator.pt",
                    {"format": FORMAT, "version": 1, "config": model.config.to_dict(), "model": model.state_dict(),
                     "task": task.describe(), "classes": classes, "tokenizer": None, "step": 0})
    (out / "fetch_detector").mkdir(parents=True)
    (out / "fetch_detector" / I3D_FILENAME).write_bytes(b"stand-in")
    feats = fvd.fvd_features_of_clips(np.load(prep / "train" / "clips.npy"), resolution=RES, model=StandIn())
    fvd.save_stats(out / "real_stats" / "embedded" / "stats.npz", feats)


def _cfg(out, **extra):
    over = {"run.out": str(out), "run.device": "cpu", "prepare.embedded.resolution": RES, "real_stats.embedded.resolution": RES,
            "train_generator.embedded_nbp.block": [1, 1, 2],
            "eval_generator.embedded_nbp.num_videos": 8, "eval_generator.embedded_nbp.batch_size": 5,
            "eval_generator.embedded_nbp.seeds": [0, 1], "eval_generator.embedded_nbp.grid_videos": 3,
            "eval_generator.embedded_nbp.top_k": 50, "eval_generator.embedded_nbp.top_p": None,
            "eval_generator.embedded_nbp.untrained_baseline": False, **extra}
    return load_config(PARAMS, over)


@pytest.fixture
def standin(monkeypatch):
    model = StandIn()
    monkeypatch.setattr(fvd, "get_i3d", lambda weights=None, device="cpu": model)
    return model


def test_class_conditional_eval(tmp_path, standin):
    out = tmp_path / "out"
    _write_upstream(out, "class")
    cfg = _cfg(out)
    run_eval_generator(cfg, "embedded_nbp")
    d = out / "eval_generator" / "embedded_nbp"
    m = json.loads((d / "metrics.json").read_text())
    assert m["steps"] == 10 and m["num_videos"] == 8 and m["frames_per_video"] == FRAMES and m["tokens_per_video"] == 20
    assert len(m["gfvd_per_seed"]) == 2 and m["gfvd_per_seed"][0] != m["gfvd_per_seed"][1] and m["gfvd_untrained"] is None
    assert m["gfvd"] == pytest.approx(np.mean(m["gfvd_per_seed"]))
    assert m["gfvd_std"] == pytest.approx(np.std(m["gfvd_per_seed"], ddof=1))
    busy = m["generate_seconds"] + m["encode_seconds"] + m["decode_seconds"]
    assert m["encode_seconds"] == 0 and m["fps"] == pytest.approx(16 * FRAMES / busy, rel=1e-2)

    # the FVD of seed 1, recomputed from the public pieces
    gen, tok = load_generator(out / "train_generator" / "embedded_nbp" / "generator.pt"), load_tokenizer(
        out / "train_tokenizer" / "embedded" / "tokenizer.pt")
    labels = draw_labels(ClipCache(out / "prepare" / "embedded", "train").labels, 8, cfg.run.seed)
    videos = []
    for b, lo in enumerate(range(0, 8, 5)):  # each batch its own stream, seeded from (seed, batch)
        rng = torch.Generator().manual_seed(int.from_bytes(np.random.SeedSequence([1, b]).generate_state(2).astype(">u4")))
        ids = gen.generate(prompt_ids(gen.task, labels=torch.as_tensor(labels[lo:lo + 5])), generator=rng, top_k=50)
        from nbp.generator.sampling import codes_of

        videos.append(tok.decode_codes(codes_of(gen.task, ids)))
    feats = fvd.fvd_features_of_clips(torch.cat(videos), resolution=RES, model=standin)
    mu, s = fvd.feature_stats(feats)
    real = fvd.load_stats(out / "real_stats" / "embedded" / "stats.npz")
    assert m["gfvd_per_seed"][1] == pytest.approx(fvd.frechet_distance_from_stats(mu, s, *real), rel=1e-6)

    grid = read_video(d / "samples.mp4")
    shown = sorted(set(labels.tolist()))[:3]
    assert m["samples"] == [f"Class{k}" for k in shown]
    assert grid.shape[0] == FRAMES and grid.shape[2] == 2 + len(shown) * (64 + 2)  # tiles enlarged to 64 pixels
    assert (d / "samples.gif").stat().st_size > 0


def test_frame_prediction_conditions_on_the_encoded_first_frames(tmp_path, standin):
    out = tmp_path / "out"
    _write_upstream(out, "frame_pred")
    gen = load_generator(out / "train_generator" / "embedded_nbp" / "generator.pt")
    tok = load_tokenizer(out / "train_tokenizer" / "embedded" / "tokenizer.pt")
    seen = []

    class Spy:
        config = tok.config

        def encode_codes(self, video):
            return tok.encode_codes(video)

        def decode_codes(self, codes):
            seen.append(codes)
            return tok.decode_codes(codes)

    clips = _clips(4, seed=7)
    timer = Timer(torch.device("cpu"))
    list(generate_videos(gen, Spy(), context=clips, num=4, batch_size=4, seed=0, device=torch.device("cpu"), timer=timer,
                         sampling={"top_k": 20}))
    with torch.no_grad():
        expect = tok.encode_codes(torch.from_numpy(clips[:, :5]).permute(0, 4, 1, 2, 3).float() / 255)
    assert expect.shape[1] == 2
    assert torch.equal(seen[0][:, :2], expect.long())  # the context latent frames are kept as given
    assert timer.seconds["encode"] > 0

    run_eval_generator(_cfg(out, **{"eval_generator.embedded_nbp.seeds": [0],
                                    "eval_generator.embedded_nbp.untrained_baseline": True}), "embedded_nbp")
    m = json.loads((out / "eval_generator" / "embedded_nbp" / "metrics.json").read_text())
    assert m["gfvd_untrained"] == pytest.approx(m["gfvd_per_seed"][0], rel=1e-9)  # the checkpoint is that untrained model
    assert m["steps"] == 6 and m["frames_per_video"] == 12 and m["tokens_per_video"] == 12 and m["encode_seconds"] > 0
    grid = read_video(out / "eval_generator" / "embedded_nbp" / "samples.mp4")
    assert grid.shape[1] == 2 + 2 * (64 + 2) and grid.shape[2] == 2 + 3 * (64 + 2)  # real row above the predictions (x8: 64 px)


def _record_generate(monkeypatch) -> list:
    """(task, prompt ids, generated ids) of every LoadedGenerator.generate call."""
    from nbp.generator import LoadedGenerator

    calls, generate = [], LoadedGenerator.generate

    def spy(self, prefix_ids, *args, **kwargs):
        ids = generate(self, prefix_ids, *args, **kwargs)
        calls.append((self.task, prefix_ids.detach().clone(), ids.detach().clone()))
        return ids

    monkeypatch.setattr(LoadedGenerator, "generate", spy)
    return calls


def test_sample_command_classes_and_context(tmp_path, standin, monkeypatch):
    from nbp.cli import main
    from nbp.data.video_io import read_clip, to_uint8_video
    from nbp.generator.sampling import codes_of

    calls = _record_generate(monkeypatch)
    out = tmp_path / "out"
    _write_upstream(out, "class")
    gen = out / "train_generator" / "embedded_nbp" / "generator.pt"
    tok = out / "train_tokenizer" / "embedded" / "tokenizer.pt"
    dst = tmp_path / "samples"
    assert main(["sample", str(gen), "--tokenizer", str(tok), "--classes", "2", "Class0", "--out", str(dst), "--seed", "3"]) == 0
    files = sorted(p.name for p in dst.iterdir())
    assert files == ["Class0_0.mp4", "Class2_0.mp4", "grid.gif", "grid.mp4"]
    assert read_video(dst / "Class2_0.mp4").shape == (FRAMES, RES, RES, 3)
    # the classes asked for, in the order asked: label 2, then Class0 (label 0)
    task, prompt, ids = calls[-1]
    assert torch.equal(prompt, prompt_ids(task, labels=torch.tensor([2, 0])))
    assert torch.equal(ids[:, : prompt.shape[1]], prompt)
    # and each file holds its own row: Class2_0.mp4 is the decoded first sample, Class0_0.mp4 the second
    decoded = to_uint8_video(load_tokenizer(tok).decode_codes(codes_of(task, ids))).astype(float)  # [2, T, H, W, 3]
    for row, name in enumerate(("Class2_0.mp4", "Class0_0.mp4")):
        err = [np.abs(read_video(dst / name).astype(float) - d).mean() for d in decoded]
        assert err[row] < err[1 - row], (name, err)
    assert main(["sample", str(gen), "--tokenizer", str(tok), "--classes", "Nope", "--out", str(dst)]) == 1

    _write_upstream(tmp_path / "fp", "frame_pred")
    video = tmp_path / "ctx.mp4"
    write_video(video, _clips(1)[0], fps=8)
    dst2 = tmp_path / "pred"
    assert main(["sample", str(tmp_path / "fp" / "train_generator" / "embedded_nbp" / "generator.pt"),
                 "--tokenizer", str(tmp_path / "fp" / "train_tokenizer" / "embedded" / "tokenizer.pt"),
                 "--context", str(video), "--num", "2", "--out", str(dst2)]) == 0
    assert sorted(p.name for p in dst2.iterdir()) == ["ctx_0.mp4", "ctx_1.mp4", "grid.gif", "grid.mp4"]
    # the context given: the first 5 frames of ctx.mp4 (2 latent frames), encoded, lead both predictions unchanged
    task, prompt, ids = calls[-1]
    fp_tok = load_tokenizer(tmp_path / "fp" / "train_tokenizer" / "embedded" / "tokenizer.pt")
    first = torch.from_numpy(read_clip(video, 5, fps=8, start="first", size=RES)).permute(3, 0, 1, 2)[None].float() / 255
    with torch.no_grad():
        context = fp_tok.encode_codes(first).long()  # [1, 2, H', W']
    assert context.shape[1] == task.context_frames == 2
    assert torch.equal(prompt, prompt_ids(task, context=context.expand(2, -1, -1, -1)))
    assert torch.equal(codes_of(task, ids)[:, :2], context.expand(2, -1, -1, -1))
