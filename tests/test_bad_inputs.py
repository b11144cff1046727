"""Bad inputs and untrusted files through the real command line, on the tiny parameter set.

Every case asserts what a user sees: one line on stderr (``nbp: error: ...``) naming the culprit (a file or a
dotted params key), a non-zero exit, no traceback, and every file that already existed under the outputs
byte-identical afterwards. The untrusted-file cases give each loader a pickle whose ``__reduce__`` would run a
command that creates a marker file, and check that the file is refused and the marker never appears.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pipeline_helpers import set_params, tiny_params

from nbp.cli import main

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# the tiny pipeline, run once: download -> prepare -> train_tokenizer -> tokenize -> train_generator


@dataclass
class Tiny:
    root: Path
    params: Path

    @property
    def out(self) -> Path:
        return self.root / "out"


def _params_file(path: Path, out: Path, extra: dict | None = None) -> Path:
    shutil.copy(REPO / "params.yaml", path)
    set_params(path, {**tiny_params(), "run.out": str(out), **(extra or {})})
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    os.environ.setdefault("NBP_PROGRESS", "0")
    root = tmp_path_factory.mktemp("bad_inputs")
    params = _params_file(root / "params.yaml", root / "out")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for argv in (["download", "embedded"], ["prepare", "embedded"], ["train_tokenizer", "embedded"],
                     ["tokenize", "embedded"], ["train_generator", "embedded_nbp"]):
            assert main([*argv, "--params", str(params)]) == 0, argv
    finally:
        torch.set_num_threads(threads)
    return Tiny(root, params)


@pytest.fixture
def own(tiny, tmp_path) -> Tiny:
    """A private copy of the tiny outputs (a case may break its inputs) with its own params file."""
    shutil.copytree(tiny.out, tmp_path / "out", symlinks=True)
    return Tiny(tmp_path, _params_file(tmp_path / "params.yaml", tmp_path / "out"))


def snapshot(*roots: Path) -> dict[str, tuple[int, str]]:
    """Every file under the roots: (size, sha256)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")) if root.is_dir() else [root] if root.exists() else []:
            if p.is_file() and not p.is_symlink():
                out[str(p)] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def refuses(capsys, argv: list[str], culprit: str, *, says: str = "", watch: tuple[Path, ...] = (), code: int | None = None,
            marker: Path | None = None) -> str:
    """Run ``nbp ARGV``: one ``nbp: error:`` line naming ``culprit``, a non-zero exit, nothing under ``watch`` changed."""
    capsys.readouterr()
    before = snapshot(*watch)
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    except BaseException as e:  # noqa: BLE001 - the command line would print a traceback
        pytest.fail(f"`nbp {' '.join(map(str, argv))}` raised {type(e).__name__}: {e} (a traceback for the user)")
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc not in (0, None), f"exit {rc}: {err}"
    if code is not None:
        assert rc == code, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("nbp: error: "), lines[0]
    assert culprit in lines[0], f"{culprit!r} not named in: {lines[0]}"
    assert says in lines[0], f"{says!r} not in: {lines[0]}"
    assert snapshot(*watch) == before, "an existing output changed"
    if marker is not None:
        assert not marker.exists(), "the pickled command ran"
    return lines[0]


# --------------------------------------------------------------------------------------
# 1. params


def _raw(tiny: Tiny) -> dict:
    return yaml.safe_load(tiny.params.read_text())


def test_malformed_yaml_names_the_file_and_line(tiny, tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text(tiny.params.read_text().replace("run:\n", "run: [unclosed\n", 1))
    refuses(capsys, ["prepare", "--params", bad], str(bad), says="not valid YAML (line", code=2, watch=(tiny.out,))


@pytest.mark.parametrize("override,key,says", [
    ("train_tokenizer.embedded.stepz=5", "train_tokenizer.embedded.stepz", "unknown key"),
    ("train_generator.embedded_nbp.steps=many", "train_generator.embedded_nbp.steps", "expected integer"),
    ("train_generator.embedded_nbp.block=[1, 1, 3]", "train_generator.embedded_nbp.block", "does not divide the latent grid"),
    ("train_generator.embedded_nbp.block=[1, 1, 0]", "train_generator.embedded_nbp.block", "must be > 0"),
    ("prepare.embedded.frames=16", "prepare.embedded.frames", "is not 1 + k*4"),
    ("eval_generator.embedded_nbp.top_p=1.5", "eval_generator.embedded_nbp.top_p", "must be in (0, 1]"),
    ("eval_generator.embedded_nbp.top_k=0", "eval_generator.embedded_nbp.top_k", "must be > 0"),
    ("eval_generator.embedded_nbp.temperature=0", "eval_generator.embedded_nbp.temperature", "must be > 0"),
    ("eval_generator.embedded_nbp.generator=nope", "eval_generator.embedded_nbp.generator",
     "is not an entry of `train_generator`"),
    ("eval_generator.embedded_nbp.real_stats=ghost", "eval_generator.embedded_nbp.real_stats", "is not an entry of `real_stats`"),
    ("run.generators=[embedded_nbp, ghost]", "run.generators", "'ghost' is not an entry"),
], ids=["unknown key", "wrong type", "block does not divide", "empty block", "frames not 1+4k", "top_p out of range",
        "top_k zero", "temperature zero", "dangling generator", "dangling real_stats", "run names a missing entry"])
def test_bad_params_name_the_key(tiny, capsys, override, key, says):
    stage = "eval_generator" if override.startswith("eval_generator") else "train_generator"
    refuses(capsys, [stage, "--params", tiny.params, "-S", override], key, says=says, code=2, watch=(tiny.out,))


def test_an_unknown_entry_on_the_command_line_is_named(tiny, capsys):
    refuses(capsys, ["eval_generator", "nope", "--params", tiny.params], "eval_generator.nope", says="no such entry",
            code=2, watch=(tiny.out,))


@pytest.mark.parametrize("override,key", [("eval_generator.embedded_nbp.num_videos=1", "eval_generator.embedded_nbp.num_videos"),
                                          ("eval_generator.embedded_nbp.seeds=[]", "eval_generator.embedded_nbp.seeds")])
def test_eval_generator_refuses_too_few_videos_or_no_seeds_before_sampling(tiny, capsys, override, key):
    """Formerly: 1 video sampled, then `features: need at least 2 feature vectors` (no key named); no seeds ended in
    a traceback (`ValueError: need at least one array to stack`)."""
    refuses(capsys, ["eval_generator", "embedded_nbp", "--params", tiny.params, "-S", override], key, code=2,
            watch=(tiny.out,))


def test_fewer_than_two_videos_to_score_is_a_params_error(tiny):
    from nbp.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(tiny.params, overrides={"eval_generator.embedded_nbp.num_videos": 1})
    assert err.value.key == "eval_generator.embedded_nbp.num_videos"


def test_no_seeds_to_evaluate_is_a_params_error(tiny):
    from nbp.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(tiny.params, overrides={"eval_generator.embedded_nbp.seeds": []})
    assert err.value.key == "eval_generator.embedded_nbp.seeds"


# --------------------------------------------------------------------------------------
# 2. data


def test_missing_dataset_root_is_named(own, capsys):
    shutil.rmtree(own.out / "download" / "embedded")
    refuses(capsys, ["prepare", "embedded", "--params", own.params], str(own.out / "download" / "embedded"),
            says="is missing (run `nbp download embedded` first)", watch=(own.out,))


def test_an_empty_split_file_is_named(own, capsys):
    split = own.out / "download" / "embedded" / "ucfTrainTestlist" / "trainlist01.txt"
    split.write_text("")
    refuses(capsys, ["prepare", "embedded", "--params", own.params], str(split), says="no videos", watch=(own.out,))


def _train_videos(own: Tiny) -> list[Path]:
    from nbp.data.datasets import UCF101

    return [v.path for v in UCF101(own.out / "download" / "embedded").videos("train")]


def _break(path: Path, how: str) -> None:
    from nbp.data.video_io import write_video

    if how == "corrupt":
        path.write_bytes(bytes(range(256)) * 40)
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif how == "zero-frame":
        path.write_bytes(b"")
    elif how == "too short":
        write_video(path, np.zeros((3, 32, 32, 3), np.uint8), fps=8)
    elif how == "missing":
        path.unlink()


BAD_VIDEOS = ["corrupt", "truncated", "zero-frame", "too short", "missing"]


def test_bad_videos_are_skipped_and_reported(own, capsys):
    """One training video of each kind of damage, under a permissive max_bad_fraction: skipped, each in the report."""
    import json

    # more training videos than kinds of damage: list every video of the split twice under different names
    videos = _train_videos(own)
    split = own.out / "download" / "embedded" / "ucfTrainTestlist" / "trainlist01.txt"
    lines = split.read_text().splitlines()
    for i, v in enumerate(videos):
        copy = v.with_name(v.stem + f"_copy{i}.avi")
        shutil.copy(v, copy)
        lines.append(lines[i].replace(v.name, copy.name))
    split.write_text("\n".join(lines) + "\n")
    videos = _train_videos(own)
    damaged = dict(zip(BAD_VIDEOS, videos))
    for how, path in damaged.items():
        _break(path, how)
    assert main(["prepare", "embedded", "--params", str(own.params), "-S", "prepare.embedded.max_bad_fraction=0.9"]) == 0
    report = json.loads((own.out / "prepare" / "embedded" / "report.json").read_text())
    skipped = {s["video"]: s for s in report["skipped"]}
    root = own.out / "download" / "embedded" / "UCF-101"
    assert set(skipped) == {str(p.relative_to(root)) for p in damaged.values()}
    kinds = {how: skipped[str(p.relative_to(root))]["kind"] for how, p in damaged.items()}
    assert kinds == {"corrupt": "corrupt", "truncated": "corrupt", "zero-frame": "empty", "too short": "too_short",
                     "missing": "corrupt"}
    assert report["splits"]["train"]["skipped"] == 5 and report["splits"]["train"]["ok"] == len(videos) - 5
    assert "no such file" in skipped[str(damaged["missing"].relative_to(root))]["reason"]
    out = capsys.readouterr().out
    assert "5 videos skipped" in out


@pytest.mark.parametrize("how", BAD_VIDEOS)
def test_bad_videos_above_max_bad_fraction_fail_naming_the_first(own, capsys, how):
    first = _train_videos(own)[0]
    _break(first, how)
    refuses(capsys, ["prepare", "embedded", "--params", own.params], first.name, says="max_bad_fraction",
            watch=(own.out / "prepare", own.out / "download"))


def test_k600_annotations_with_missing_columns_are_named(own, capsys):
    root = own.out / "download" / "k600" / "k600"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    (root / "annotations").mkdir()
    csv = root / "annotations" / "train.csv"
    csv.write_text("label,youtube_id\nzumba,aaaaaaaaaaa\n")
    refuses(capsys, ["prepare", "k600", "--params", own.params, "-S", "run.datasets=[embedded, k600]"], str(csv),
            says="missing columns ['time_end', 'time_start']", watch=(own.out,))


# --------------------------------------------------------------------------------------
# 3. nbp fvd


def _video_folder(folder: Path, n: int, frames: int = 18, size: int = 32, sizes: list[int] | None = None) -> Path:
    from nbp.data.video_io import write_video

    folder.mkdir(parents=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        s = sizes[i] if sizes else size
        write_video(folder / f"v{i}.mp4", rng.integers(0, 256, (frames, s, s, 3), dtype=np.uint8), fps=8)
    return folder


@pytest.fixture(scope="module")
def fvd_sets(tmp_path_factory):
    from nbp.metrics.detector import cached_i3d_weights

    root = tmp_path_factory.mktemp("fvd_sets")
    return root, _video_folder(root / "two", 2), cached_i3d_weights()


@pytest.mark.parametrize("side", ["real", "gen"])
def test_fvd_with_one_video_says_which_set(fvd_sets, tmp_path, capsys, side):
    root, two, weights = fvd_sets
    one = _video_folder(tmp_path / "one", 1)
    pair = [one, two] if side == "real" else [two, one]
    refuses(capsys, ["fvd", *pair, "--weights", weights, "--device", "cpu"], str(one), says=f"{side} set", watch=(root, one))


@pytest.mark.parametrize("side", ["real", "gen"])
def test_fvd_with_one_feature_vector_says_which_set(tmp_path, capsys, side):
    one, many = tmp_path / "one.npy", tmp_path / "many.npy"
    np.save(one, np.zeros((1, 400), np.float32))
    np.save(many, np.random.default_rng(0).normal(size=(5, 400)).astype(np.float32))
    pair = [one, many] if side == "real" else [many, one]
    refuses(capsys, ["fvd", *pair], str(one), says=f"the {side} set has 1 feature vectors", watch=(tmp_path,))


def test_fvd_videos_shorter_than_the_protocol(fvd_sets, tmp_path, capsys):
    root, two, weights = fvd_sets
    short = _video_folder(tmp_path / "short", 2, frames=10)
    refuses(capsys, ["fvd", two, short, "--weights", weights, "--device", "cpu"], str(short / "v0.mp4"), says="gen set",
            watch=(root, short))


def test_fvd_clip_array_shorter_than_the_protocol(tmp_path, capsys):
    clips = tmp_path / "clips.npy"
    np.save(clips, np.zeros((3, 8, 32, 32, 3), np.uint8))
    refuses(capsys, ["fvd", clips, clips, "--frames", "16"], str(clips), says="8 frames", watch=(tmp_path,))


def test_fvd_folder_of_mixed_resolutions_names_the_odd_video(fvd_sets, tmp_path, capsys):
    root, two, weights = fvd_sets
    mixed = _video_folder(tmp_path / "mixed", 2, sizes=[32, 48])
    refuses(capsys, ["fvd", mixed, two, "--weights", weights, "--device", "cpu"], str(mixed / "v1.mp4"), says="--resolution",
            watch=(root, mixed))


def test_fvd_object_array_is_refused_by_the_real_command_line(tmp_path):
    """The issue's case, as a user runs it: `python -m nbp fvd objects.npy feats.npy` in a fresh process."""
    import subprocess
    import sys

    obj = tmp_path / "objects.npy"
    np.save(obj, np.array([{"a": 1}, [2, 3]], dtype=object), allow_pickle=True)
    feats = tmp_path / "f.npy"
    np.save(feats, np.random.default_rng(0).normal(size=(4, 400)).astype(np.float32))
    done = subprocess.run([sys.executable, "-m", "nbp", "fvd", str(obj), str(feats)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith(f"nbp: error: {obj}: ")


def test_fvd_object_array_is_refused_in_one_line(tmp_path, capsys):
    """Formerly `ValueError: Array can't be memory-mapped: Python objects in dtype.` as a traceback."""
    obj = tmp_path / "objects.npy"
    np.save(obj, np.array([{"a": 1}, [2, 3]], dtype=object), allow_pickle=True)
    feats = tmp_path / "f.npy"
    np.save(feats, np.random.default_rng(0).normal(size=(4, 400)).astype(np.float32))
    refuses(capsys, ["fvd", obj, feats], str(obj), says="pickled objects", watch=(tmp_path,))
    refuses(capsys, ["fvd", feats, obj], str(obj), says="pickled objects", watch=(tmp_path,))


# --------------------------------------------------------------------------------------
# 4. checkpoints


def _ckpt(own: Tiny, stage: str, entry: str) -> Path:
    return own.out / stage / entry / ("tokenizer.pt" if stage == "train_tokenizer" else "generator.pt")


def test_a_checkpoint_of_the_wrong_kind_is_named(own, capsys):
    gen = _ckpt(own, "train_generator", "embedded_nbp")
    shutil.copy(_ckpt(own, "train_tokenizer", "embedded"), gen)
    refuses(capsys, ["eval_generator", "embedded_nbp", "--params", own.params], str(gen),
            says="is a 'nbp-tokenizer' checkpoint, expected 'nbp-generator'", watch=(own.out,))


@pytest.mark.parametrize("stage,entry,command", [("train_tokenizer", "embedded", "tokenize"),
                                                 ("train_generator", "embedded_nbp", "eval_generator")])
def test_a_truncated_checkpoint_is_named(own, capsys, stage, entry, command):
    path = _ckpt(own, stage, entry)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    name = "embedded" if command == "tokenize" else "embedded_nbp"
    refuses(capsys, [command, name, "--params", own.params], str(path), says="not a loadable", watch=(own.out,))


def _tokenizer_with(own: Tiny, **changes) -> Path:
    """Replace the tiny tokenizer.pt by one of another architecture (same format)."""
    import dataclasses

    from nbp.checkpoint import load_checkpoint, save_checkpoint
    from nbp.tokenizer import TokenizerConfig, VideoTokenizer, tokenizer_checkpoint

    path = _ckpt(own, "train_tokenizer", "embedded")
    cfg = dataclasses.replace(TokenizerConfig.from_dict(load_checkpoint(path)["config"]), **changes)
    save_checkpoint(path, tokenizer_checkpoint(VideoTokenizer(cfg)))
    return path


def test_a_generator_for_another_vocabulary_is_refused(own, capsys):
    tok = _tokenizer_with(own, levels=(5, 5, 5))
    gen = _ckpt(own, "train_generator", "embedded_nbp")
    refuses(capsys, ["eval_generator", "embedded_nbp", "--params", own.params], str(gen), says=f"do not match {tok}",
            watch=(own.out,))


def test_a_generator_for_another_token_grid_is_refused(own, capsys):
    """The tokenizer now makes a coarser latent grid than the one the generator's blocks were laid out on."""
    from nbp.checkpoint import load_checkpoint

    c = load_checkpoint(_ckpt(own, "train_tokenizer", "embedded"))["config"]
    # one more spatial downsampling stage: the same codes, a latent grid half as wide
    _tokenizer_with(own, channel_mult=(*c["channel_mult"], c["channel_mult"][-1]), enc_res=(*c["enc_res"], 1),
                    dec_res=(1, *c["dec_res"]), temporal_down=(*c["temporal_down"], False))
    gen = _ckpt(own, "train_generator", "embedded_nbp")
    refuses(capsys, ["eval_generator", "embedded_nbp", "--params", own.params], str(gen), says="latent grid",
            watch=(own.out,))


def test_generator_weights_that_do_not_fit_its_config_are_named(own, capsys):
    from nbp.checkpoint import load_checkpoint, save_checkpoint

    path = _ckpt(own, "train_generator", "embedded_nbp")
    ckpt = load_checkpoint(path)
    ckpt["config"] = {**ckpt["config"], "n_embd": ckpt["config"]["n_embd"] * 2}
    save_checkpoint(path, ckpt)
    refuses(capsys, ["eval_generator", "embedded_nbp", "--params", own.params], str(path), says="do not match", watch=(own.out,))


def _released_tokenizer_file(path: Path, state: dict) -> Path:
    torch.save({"model_state_dict": state}, path)
    return path


def test_released_tokenizer_with_an_unexpected_key(tmp_path, capsys):
    src = _released_tokenizer_file(tmp_path / "magvit2_ucf.pt", {"module.encoder_layers.0.conv.weight": torch.zeros(1),
                                                                  "module.encoder_layers.99.extra": torch.zeros(1)})
    refuses(capsys, ["import-checkpoint", src, tmp_path / "tokenizer.pt", "--tokenizer-preset", "base"], str(src),
            says="unexpected key 'module.encoder_layers.99.extra'", watch=(tmp_path,))
    assert not (tmp_path / "tokenizer.pt").exists()


def test_released_tokenizer_with_a_mis_shaped_key(tmp_path, capsys):
    src = _released_tokenizer_file(tmp_path / "magvit2_ucf.pt", {"module.encoder_layers.0.conv.weight": torch.zeros(2, 3)})
    refuses(capsys, ["import-checkpoint", src, tmp_path / "tokenizer.pt", "--tokenizer-preset", "base"], str(src),
            says="'module.encoder_layers.0.conv.weight' has shape (2, 3)", watch=(tmp_path,))


def test_released_generator_with_a_mis_shaped_key(tmp_path, capsys):
    import argparse

    C, V = 8, 24
    sd = {"transformer.tok_emb.weight": torch.zeros(V, C), "transformer.pos_emb": torch.zeros(1, 64, C),
          "transformer.uncond_embedding": torch.zeros(0, C), "transformer.ln_f.weight": torch.ones(C),
          "transformer.ln_f.bias": torch.zeros(C), "transformer.head.weight": torch.zeros(V, C + 1)}
    src = tmp_path / "k600.ckpt"
    hp = argparse.Namespace(n_layer=0, n_head=2, n_embd=C, resolution=32, vocab_size=V, sequence_length=9,
                            token_number_per_step=4)
    torch.save({"state_dict": sd, "hyper_parameters": hp}, src)
    refuses(capsys, ["import-checkpoint", src, tmp_path / "generator.pt"], str(src), says="transformer.head.weight",
            watch=(tmp_path,))


# --------------------------------------------------------------------------------------
# 5. untrusted files: a pickle that would run a command


class RunsACommand:
    """Unpickling this calls os.system(touch MARKER)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_torch(path: Path, marker: Path, wrap=lambda payload: {"format": "nbp-generator", "model": payload}) -> Path:
    torch.save(wrap(RunsACommand(marker)), path)
    return path


def _evil_pickle(path: Path, marker: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"params": RunsACommand(marker), "batch_stats": {}}, f)
    return path


def _evil_npy(path: Path, marker: Path) -> Path:
    np.save(path, np.array([RunsACommand(marker), 1], dtype=object), allow_pickle=True)
    return path


def _evil_npz(path: Path, marker: Path) -> Path:
    with open(path, "wb") as f:
        np.savez(f, mu=np.array([RunsACommand(marker)], dtype=object), sigma=np.zeros((1, 1)))
    return path


def test_the_payload_really_runs_when_unpickled(tmp_path):
    """The control: unrestricted unpickling of these files does create the marker."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(RunsACommand(marker)))
    assert marker.exists()


@pytest.mark.parametrize("stage,entry,command,culprit", [
    ("train_tokenizer", "embedded", "tokenize", "tokenizer.pt"),
    ("train_generator", "embedded_nbp", "eval_generator", "generator.pt"),
])
def test_our_checkpoints_refuse_a_pickle_that_runs_a_command(own, capsys, stage, entry, command, culprit):
    marker = own.root / "ran"
    path = _evil_torch(_ckpt(own, stage, entry), marker)
    name = "embedded" if command == "tokenize" else "embedded_nbp"
    refuses(capsys, [command, name, "--params", own.params], str(path), says="posix.system", watch=(own.out,), marker=marker)


@pytest.mark.parametrize("stage,entry", [("train_tokenizer", "embedded"), ("train_generator", "embedded_nbp")])
def test_rolling_training_checkpoints_refuse_a_pickle_that_runs_a_command(own, capsys, stage, entry):
    """A resumed training reads {run.out}/checkpoints/<stage>/<entry>/last.pt: a hostile one is refused, not run."""
    marker = own.root / "ran"
    last = own.out / "checkpoints" / stage / entry / "last.pt"
    assert last.is_file()
    _evil_torch(last, marker)
    refuses(capsys, [stage, entry, "--params", own.params], str(last), says="posix.system", watch=(own.out / stage,),
            marker=marker)


def test_sample_refuses_a_pickle_that_runs_a_command(tmp_path, capsys):
    marker = tmp_path / "ran"
    path = _evil_torch(tmp_path / "generator.pt", marker)
    refuses(capsys, ["sample", path, "--out", tmp_path / "s"], str(path), watch=(tmp_path,), marker=marker)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("suffix,wrap", [
    (".pt", lambda p: {"model_state_dict": {"module.encoder_layers.0.conv.weight": p}}),
    (".ckpt", lambda p: {"state_dict": {}, "hyper_parameters": p}),
], ids=["released tokenizer", "released generator"])
def test_released_importers_refuse_a_pickle_that_runs_a_command(tmp_path, capsys, suffix, wrap):
    marker = tmp_path / "ran"
    src = _evil_torch(tmp_path / f"released{suffix}", marker, wrap)
    refuses(capsys, ["import-checkpoint", src, tmp_path / "ours.pt"], str(src), says="posix.system", watch=(tmp_path,),
            marker=marker)


def test_released_tokenizer_stage_refuses_a_pickle_that_runs_a_command(own, capsys):
    marker = own.root / "ran"
    src = _evil_torch(own.root / "magvit2_ucf.pt", marker, lambda p: {"model_state_dict": {"k": p}})
    refuses(capsys, ["train_tokenizer", "embedded", "--params", own.params, "-S", "train_tokenizer.embedded.source=released",
                     "-S", "train_tokenizer.embedded.preset=base", "-S", "train_tokenizer.embedded.channels=null",
                     "-S", f"train_tokenizer.embedded.checkpoint={src}"],
            str(src), watch=(own.out,), marker=marker)


def test_released_generator_stage_refuses_a_pickle_that_runs_a_command(own, capsys):
    marker = own.root / "ran"
    src = _evil_torch(own.root / "k600_base_nbp16.ckpt", marker, lambda p: {"state_dict": {"transformer.x": p}})
    refuses(capsys, ["train_generator", "released_k600_nbp16", "--params", own.params, "-S",
                     f"train_generator.released_k600_nbp16.checkpoint={src}"], str(src), says="posix.system",
            watch=(own.out,), marker=marker)
    assert not (own.out / "train_generator" / "released_k600_nbp16").exists()


def test_i3d_weights_refuse_a_pickle_that_runs_a_command(fvd_sets, tmp_path, capsys):
    root, two, _ = fvd_sets
    marker = tmp_path / "ran"
    weights = _evil_pickle(tmp_path / "i3d-kinetics-400.ckpt", marker)
    refuses(capsys, ["fvd", two, two, "--weights", weights, "--device", "cpu"], str(weights), says="posix.system",
            watch=(root, tmp_path), marker=marker)


def test_fetch_detector_refuses_a_local_file_that_fails_its_checksum(own, capsys):
    marker = own.root / "ran"
    weights = _evil_pickle(own.root / "i3d-kinetics-400.ckpt", marker)
    refuses(capsys, ["fetch_detector", "--params", own.params, "-S", f"fetch_detector.path={weights}"], str(weights),
            says="sha256", watch=(own.out,), marker=marker)
    assert not (own.out / "fetch_detector").exists()


def test_lpips_weights_refuse_a_pickle_that_runs_a_command(own, capsys, monkeypatch):
    marker = own.root / "ran"
    vgg = _evil_torch(own.root / "vgg16.pth", marker, lambda p: {"features.0.weight": p})
    lin = _evil_torch(own.root / "vgg.pth", marker, lambda p: {"lin0.model.1.weight": p})
    monkeypatch.setenv("NBP_LPIPS_VGG", str(vgg))
    monkeypatch.setenv("NBP_LPIPS_LIN", str(lin))
    (own.out / "fetch_detector").mkdir(exist_ok=True)
    from nbp.metrics.detector import cached_i3d_weights

    shutil.copy(cached_i3d_weights(), own.out / "fetch_detector" / "i3d-kinetics-400.ckpt")
    refuses(capsys, ["eval_tokenizer", "embedded", "--params", own.params], str(vgg), says="posix.system", watch=(own.out,),
            marker=marker)


@pytest.mark.parametrize("maker", [_evil_npy, _evil_npz], ids=["npy", "npz"])
def test_fvd_arrays_and_stats_refuse_a_pickle_that_runs_a_command(tmp_path, capsys, maker):
    marker = tmp_path / "ran"
    evil = maker(tmp_path / f"evil{'.npy' if maker is _evil_npy else '.npz'}", marker)
    feats = tmp_path / "f.npy"
    np.save(feats, np.random.default_rng(0).normal(size=(4, 400)).astype(np.float32))
    refuses(capsys, ["fvd", evil, feats], str(evil), watch=(tmp_path,), marker=marker)


def test_token_shards_refuse_a_pickle_that_runs_a_command(own, capsys):
    marker = own.root / "ran"
    tokens = _evil_npy(own.out / "tokenize" / "embedded" / "train" / "tokens.npy", marker)
    refuses(capsys, ["train_generator", "embedded_nbp", "--params", own.params, "-S", "train_generator.embedded_nbp.steps=2"],
            str(tokens), says="pickled objects", watch=(own.out / "tokenize", own.out / "train_generator"), marker=marker)


def test_clip_cache_refuses_a_pickle_that_runs_a_command(own, capsys):
    marker = own.root / "ran"
    clips = _evil_npy(own.out / "prepare" / "embedded" / "train" / "clips.npy", marker)
    refuses(capsys, ["tokenize", "embedded", "--params", own.params], str(clips), says="pickled objects",
            watch=(own.out / "prepare", own.out / "tokenize"), marker=marker)


def test_real_stats_file_refuses_a_pickle_that_runs_a_command(own, capsys):
    marker = own.root / "ran"
    (own.out / "real_stats" / "embedded").mkdir(parents=True)
    stats = _evil_npz(own.out / "real_stats" / "embedded" / "stats.npz", marker)
    refuses(capsys, ["eval_generator", "embedded_nbp", "--params", own.params], str(stats), watch=(own.out,), marker=marker)


# --------------------------------------------------------------------------------------
# 6. downloads: every fetched file is checksum-verified before use, archives cannot escape


@pytest.fixture
def server(monkeypatch, tmp_path):
    from test_data_download import Server

    from nbp.data import fetch as F

    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv(F.LOCK_ENV, str(tmp_path / "checksums.lock.json"))
    s = Server()
    yield s
    s.close()


def _lock(tmp_path: Path, url: str, sha256: str) -> None:
    from nbp.data import fetch as F

    F.LockFile(tmp_path / "checksums.lock.json").record(url, sha256, 1)


def _k600_server(server, members: list[tuple[str, str, bytes | str]], tmp_path: Path) -> dict:
    from test_data_download import _tar

    server.files["/k600/train/part_0.tar.gz"] = _tar(tmp_path / "p0.tgz", members).read_bytes()
    server.files["/k600/train/k600_train_path.txt"] = f"{server.url}/k600/train/part_0.tar.gz\n".encode()
    server.files["/k600/annotations/train.csv"] = b"label,youtube_id,time_start,time_end,split\nzumba,aaaaaaaaaaa,0,10,train\n"
    return {"lists": f"{server.url}/k600", "annotations": f"{server.url}/k600/annotations"}


def test_download_with_a_checksum_mismatch_is_refused(own, server, tmp_path, capsys):
    urls = _k600_server(server, [("aaaaaaaaaaa_000000_000010.mp4", "file", b"video")], tmp_path)
    part = f"{server.url}/k600/train/part_0.tar.gz"
    _lock(tmp_path, part, "0" * 64)  # recorded at an earlier download; the server now sends other bytes
    override = f"download.k600.urls={{lists: {urls['lists']}, annotations: {urls['annotations']}}}"
    refuses(capsys, ["download", "k600", "--params", own.params, "-S", override, "-S", "download.k600.splits=[train]"], part,
            says="does not match", watch=(own.out / "download",))
    assert not (own.out / "download" / "k600").exists()


@pytest.mark.parametrize("members,says", [
    ([("aaaaaaaaaaa_000000_000010.mp4", "file", b"v"), ("../../evil.txt", "file", b"x")], "contains '..'"),
    ([("link", "sym", "../../.."), ("aaaaaaaaaaa_000000_000010.mp4", "file", b"v")], "points outside the target"),
    ([("h", "hard", "/etc/passwd")], "outside the target"),
    ([("dev0", "chr", "")], "device"),
    ([("/tmp/nbp-absolute-member.txt", "file", b"x")], "absolute path"),
], ids=["dotdot", "escaping symlink", "absolute hard link", "device", "absolute path"])
def test_download_of_an_unsafe_archive_is_refused(own, server, tmp_path, capsys, members, says):
    urls = _k600_server(server, members, tmp_path)
    override = f"download.k600.urls={{lists: {urls['lists']}, annotations: {urls['annotations']}}}"
    refuses(capsys, ["download", "k600", "--params", own.params, "-S", override, "-S", "download.k600.splits=[train]"],
            "part_0.tar.gz", says=says, watch=(own.out / "download",))
    assert not (own.out / "download" / "k600").exists()
    assert not list(own.root.rglob("evil.txt"))


def test_released_generator_download_is_checksum_verified(own, server, tmp_path, capsys):
    server.files["/k600_base_nbp16.ckpt"] = b"not the file that was recorded"
    url = f"{server.url}/k600_base_nbp16.ckpt"
    _lock(tmp_path, url, "0" * 64)
    refuses(capsys, ["train_generator", "released_k600_nbp16", "--params", own.params, "-S",
                     f"train_generator.released_k600_nbp16.checkpoint={url}"], url, says="does not match",
            watch=(own.out / "train_generator",))
    assert not (own.out / "train_generator" / "released_k600_nbp16").exists()


def test_released_tokenizer_download_is_checksum_verified(own, server, tmp_path, capsys):
    server.files["/magvit2_k600.pt"] = b"not the file that was recorded"
    url = f"{server.url}/magvit2_k600.pt"
    _lock(tmp_path, url, "0" * 64)
    refuses(capsys, ["train_tokenizer", "released_k600", "--params", own.params, "-S",
                     f"train_tokenizer.released_k600.checkpoint={url}"], url, says="does not match",
            watch=(own.out / "train_tokenizer",))
