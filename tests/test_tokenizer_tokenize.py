"""The tokenize stage: prepared clips + a tokenizer -> token shards that generator training reads."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nbp.config import load_config
from nbp.generator.data import TokenShards
from nbp.tokenizer import VideoTokenizer, preset, tokenizer_checkpoint
from nbp.tokenizer.tokenize import run_tokenize, select_clips

REPO = Path(__file__).resolve().parents[1]


def test_select_clips_keeps_first_per_video():
    videos = ["a", "a", "a", "b", "c", "c", "b"]
    assert select_clips(videos, 2).tolist() == [0, 1, 3, 4, 5, 6]
    assert select_clips(videos, 1).tolist() == [0, 3, 4]
    assert select_clips(videos, None).tolist() == list(range(7))


def _prepare(root: Path, split: str, videos: int, per_video: int, rng) -> None:
    n = videos * per_video
    d = root / split
    d.mkdir(parents=True)
    np.save(d / "clips.npy", rng.integers(0, 256, size=(n, 17, 8, 8, 3), dtype=np.uint8))
    video = [f"v_Shape{i % 2}_g{i:02d}" for i in range(videos) for _ in range(per_video)]
    label = [i % 2 for i in range(videos) for _ in range(per_video)]
    pd.DataFrame({"clip": range(n), "video": video, "label": label, "class_name": [f"Shape{x}" for x in label],
                  "class_text": [f"shape {x}" for x in label], "fps": 8, "num_frames": 40, "start": 0}).to_csv(
        d / "manifest.csv", index=False)


def test_tokenize_stage_writes_the_tokenizer_codes(tmp_path, monkeypatch):
    monkeypatch.setenv("NBP_PROGRESS", "0")
    rng = np.random.default_rng(0)
    prep = tmp_path / "prepare" / "embedded"
    _prepare(prep, "train", videos=3, per_video=3, rng=rng)
    _prepare(prep, "val", videos=2, per_video=1, rng=rng)
    classes = [{"label": i, "name": f"Shape{i}", "text": f"shape {i}"} for i in range(2)]
    (prep / "classes.json").write_text(json.dumps(classes))
    torch.manual_seed(0)
    tok = VideoTokenizer(preset("small")).eval()
    tok_path = tmp_path / "train_tokenizer" / "embedded" / "tokenizer.pt"
    tok_path.parent.mkdir(parents=True)
    torch.save(tokenizer_checkpoint(tok), tok_path)

    cfg = load_config(REPO / "params.yaml", {"run.out": str(tmp_path), "run.device": "cpu",
                                             "prepare.embedded.train_clips_per_video": 3,
                                             "tokenize.embedded.train_clips_per_video": 2, "tokenize.embedded.batch_size": 4})
    run_tokenize(cfg, "embedded")
    out = tmp_path / "tokenize" / "embedded"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["grid"] == [5, 2, 2] and meta["vocab_size"] == 1000 and meta["classes"] == classes
    assert meta["clips"] == {"train": 6, "val": 2}
    train = TokenShards(out, "train")
    assert train.tokens.dtype == np.int16
    assert train.manifest["clip"].tolist() == [0, 1, 3, 4, 6, 7]  # two clips of each of the three videos
    clips = np.load(prep / "train" / "clips.npy")[[0, 1, 3, 4, 6, 7]]
    with torch.no_grad():
        expect = tok.encode_codes(torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 255)
    assert torch.equal(torch.from_numpy(train.tokens.astype(np.int64)), expect.long())
    assert train.labels.tolist() == [0, 0, 1, 1, 0, 0]

    bad = load_config(REPO / "params.yaml", {"run.out": str(tmp_path), "tokenize.embedded.train_clips_per_video": 5})
    from nbp.config import ConfigError

    with pytest.raises(ConfigError, match="train_clips_per_video"):
        run_tokenize(bad, "embedded")
