"""Dataset readers on files in the real layouts (UCF-101 split files, K600 CSVs) and the embedded generator."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from nbp.data import embedded
from nbp.data.datasets import UCF101, Kinetics600, camel_to_text, open_dataset
from nbp.data.video_io import probe, read_video
from nbp.errors import NbpError
from nbp.generator.layout import TEXT_IDS_FILE

# the copy the package ships and reads at run time (the released model's class texts and their LLaMA ids)
PACKAGED_TSV = TEXT_IDS_FILE


def test_camel_to_text_known_cases():
    assert camel_to_text("ApplyEyeMakeup") == "apply eye makeup"
    assert camel_to_text("YoYo") == "yo yo"
    assert camel_to_text("PushUps") == "push ups"
    assert camel_to_text("HandstandPushups") == "handstand pushups"
    assert camel_to_text("Skijet") == "skijet"
    assert camel_to_text("TTShot") == "tt shot"


def test_camel_to_text_matches_the_released_class_texts():
    rows = [ln.split("\t") for ln in PACKAGED_TSV.read_text().splitlines()[1:] if ln.strip()]
    assert len(rows) == 101
    assert [camel_to_text(name) for name, _, _ in rows] == [text for _, text, _ in rows]


def _touch(p: Path) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")


def _ucf_layout(root: Path) -> None:
    """The official layout, with its quirks: CRLF lines, 1-based labels, test lists without labels,
    and the HandstandPushups folder whose files are spelled v_HandStandPushups_..."""
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_bytes(b"1 ApplyEyeMakeup\r\n2 HandstandPushups\r\n3 YoYo\r\n")
    train = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1", "HandstandPushups/v_HandStandPushups_g08_c01.avi 2",
             "YoYo/v_YoYo_g09_c02.avi 3"]
    test = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "YoYo/v_YoYo_g01_c03.avi"]
    (lists / "trainlist01.txt").write_bytes(("\r\n".join(train) + "\r\n").encode())
    (lists / "testlist01.txt").write_bytes(("\r\n".join(test) + "\r\n").encode())
    (lists / "trainlist02.txt").write_bytes(b"YoYo/v_YoYo_g01_c03.avi 3\r\n")
    (lists / "testlist02.txt").write_bytes(b"ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi\r\n")
    for rel in train + test:
        _touch(root / "UCF-101" / rel.split()[0])


def test_ucf101_reader_official_layout(tmp_path):
    _ucf_layout(tmp_path)
    ds = UCF101(tmp_path)
    assert [(c.label, c.name, c.text) for c in ds.classes] == [
        (0, "ApplyEyeMakeup", "apply eye makeup"), (1, "HandstandPushups", "handstand pushups"), (2, "YoYo", "yo yo")]
    train = ds.videos("train")
    assert [(v.video, v.label, v.class_text) for v in train] == [
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", 0, "apply eye makeup"),
        ("HandstandPushups/v_HandStandPushups_g08_c01.avi", 1, "handstand pushups"),
        ("YoYo/v_YoYo_g09_c02.avi", 2, "yo yo")]
    assert all(v.path.is_file() for v in train)
    val = ds.videos("val")
    assert [(v.video, v.label) for v in val] == [("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", 0),
                                                 ("YoYo/v_YoYo_g01_c03.avi", 2)]
    ds2 = UCF101(tmp_path, split=2)
    assert [v.label for v in ds2.videos("train")] == [2] and [v.label for v in ds2.videos("val")] == [0]
    with pytest.raises(NbpError, match="trainlist03.txt: not found"):
        UCF101(tmp_path, split=3).videos("train")


def test_ucf101_reader_rejects_inconsistent_lists(tmp_path):
    _ucf_layout(tmp_path)
    (tmp_path / "ucfTrainTestlist" / "trainlist01.txt").write_bytes(b"YoYo/v_YoYo_g09_c02.avi 1\r\n")
    with pytest.raises(NbpError, match=r"trainlist01.txt:1: label 1 does not match class folder 'YoYo'"):
        UCF101(tmp_path).videos("train")
    (tmp_path / "ucfTrainTestlist" / "testlist01.txt").write_bytes(b"Nope/v_Nope_g01_c01.avi\r\n")
    with pytest.raises(NbpError, match="testlist01.txt:1: 'Nope/v_Nope_g01_c01.avi' is not in a class folder"):
        UCF101(tmp_path).videos("val")
    with pytest.raises(NbpError, match="UCF-101: not found"):
        UCF101(tmp_path / "elsewhere")


def test_kinetics600_reader_cvdf_layout(tmp_path):
    k = tmp_path / "k600"
    (k / "annotations").mkdir(parents=True)
    (k / "annotations" / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "playing drums,--6bJUbfpnQ,17,27,train\n"
        "abseiling,a_b-c_d_e_f,0,10,train\n"
        "abseiling,missingvid1,5,15,train\n"
        "zumba,Zz9_zZ9_zZ9,100,110,train\n")
    (k / "annotations" / "val.csv").write_text(
        "label,youtube_id,time_start,time_end,split\nzumba,valvideo001,3,13,validate\n")
    for name in ["train/--6bJUbfpnQ_000017_000027.mp4", "train/part_0/a_b-c_d_e_f_000000_000010.mp4",
                 "train/Zz9_zZ9_zZ9_000100_000110.mp4", "train/not_listed_000001_000002.mp4",
                 "val/valvideo001_000003_000013.mp4"]:
        _touch(k / name)
    ds = open_dataset("k600", tmp_path)
    assert isinstance(ds, Kinetics600)
    assert [(c.label, c.name, c.text) for c in ds.classes] == [
        (0, "abseiling", "abseiling"), (1, "playing drums", "playing drums"), (2, "zumba", "zumba")]
    train = ds.videos("train")
    assert [(v.video, v.label) for v in train] == [
        ("--6bJUbfpnQ_000017_000027.mp4", 1), ("part_0/a_b-c_d_e_f_000000_000010.mp4", 0), ("Zz9_zZ9_zZ9_000100_000110.mp4", 2)]
    assert ds.missing["train"] == 1
    assert [(v.video, v.label, v.class_text) for v in ds.videos("val")] == [("valvideo001_000003_000013.mp4", 2, "zumba")]
    assert ds.missing["val"] == 0


SMALL = SimpleNamespace(classes=8, train_per_class=3, test_per_class=2, size=32, frames=12, fps=8, seed=0)


def test_embedded_classes_differ_in_shape_colour_and_motion():
    first8 = embedded.CLASSES[:8]
    for attr in ("shape", "colour", "motion"):
        assert len({getattr(c, attr) for c in first8}) == 8, attr
    assert len({c.name for c in embedded.CLASSES}) == len(embedded.CLASSES) == 12
    assert len({(c.shape, c.colour, c.motion) for c in embedded.CLASSES}) == 12


def test_embedded_shapes_are_large_coloured_and_moving():
    for c, cls in enumerate(embedded.CLASSES):
        v = embedded.render_video(cls, 64, 17, np.random.default_rng([0, c]))
        fg = v.max(-1) > 40  # [T, H, W] shape pixels
        area = fg.mean(axis=(1, 2))
        assert area.min() > 0.02 and area.max() < 0.5, cls.name  # large, never clipped to nothing
        inner = v[fg & (v.max(-1) > 0.9 * max(cls.colour))]  # fully covered pixels
        assert np.abs(inner.mean(0) - np.array(cls.colour)).max() < 8, cls.name
        motion = np.abs(v[1:].astype(int) - v[:-1]).mean(axis=(1, 2, 3))  # per-step change
        assert motion.mean() > 1.0 and (motion[1:] + motion[:-1] > 0.3).all(), cls.name  # never still for two steps


def test_embedded_dataset_in_ucf_layout_is_read_by_the_ucf_reader(tmp_path):
    counts = embedded.generate(tmp_path / "a", SMALL)
    assert counts == {"classes": 8, "train": 24, "test": 16}
    lists = tmp_path / "a" / "ucfTrainTestlist"
    assert lists.joinpath("classInd.txt").read_bytes().startswith(b"1 RedCircleSlide\r\n2 GreenSquareDrop\r\n")
    train_lines = lists.joinpath("trainlist01.txt").read_bytes().decode().split("\r\n")[:-1]
    test_lines = lists.joinpath("testlist01.txt").read_bytes().decode().split("\r\n")[:-1]
    assert all(re.fullmatch(r"(\w+)/v_\1_g\d\d_c\d\d\.avi \d+", ln) for ln in train_lines)
    assert all(re.fullmatch(r"(\w+)/v_\1_g\d\d_c\d\d\.avi", ln) for ln in test_lines)
    ds = UCF101(tmp_path / "a")
    train, val = ds.videos("train"), ds.videos("val")
    assert len(train) == 24 and len(val) == 16
    assert not {v.video for v in train} & {v.video for v in val}
    assert [c.text for c in ds.classes][:3] == ["red circle slide", "green square drop", "blue triangle diagonal"]
    info = probe(train[0].path)
    assert (info.num_frames, info.fps, info.width, info.height, info.codec) == (12, 8.0, 32, 32, "mpeg4")
    # decoded videos are close to the rendered ones (compression does not hide the shapes)
    rendered = embedded.render_video(embedded.CLASSES[0], 32, 12, np.random.default_rng([0, 0, True, 0]))
    mse = ((read_video(train[0].path).astype(float) - rendered) ** 2).mean()
    assert 10 * np.log10(255**2 / mse) > 28
    # deterministic: the same spec gives byte-identical files
    embedded.generate(tmp_path / "b", SMALL)
    digest = {p.relative_to(tmp_path / "a"): hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "a").rglob("*.*")}
    again = {p.relative_to(tmp_path / "b"): hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "b").rglob("*.*")}
    assert digest == again and len(digest) == 40 + 3
