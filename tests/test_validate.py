"""nbp.validate: each inconsistency between entries that a stage would find only at run time is found up front, in
one line naming the keys; every suite of params.yaml passes; only the selected entries (and what they read) count."""

from __future__ import annotations

import argparse

import pytest
import torch
from pipeline_helpers import ROOT

from nbp import dag
from nbp.config import ConfigError, load_config
from nbp.suites import SUITES
from nbp.validate import check_consistency, involved, problems

PARAMS = ROOT / "params.yaml"


@pytest.fixture(autouse=True)
def no_lpips_env(monkeypatch):
    """No LPIPS weights in the environment: the paper tokenizers' (perceptual: lpips) come from the fetch_lpips stage."""
    monkeypatch.delenv("NBP_LPIPS_VGG", raising=False)
    monkeypatch.delenv("NBP_LPIPS_LIN", raising=False)


def cfg_of(suite: str = "embedded", **over):
    lists = SUITES[suite][1]
    return load_config(PARAMS, {**{f"run.{k}": v for k, v in lists.items()}, **over})


def messages(cfg) -> list[str]:
    """Each problem as ``key: problem`` (without the params file's path)."""
    return [f"{e.key}: {e.problem}" for e in problems(cfg)]


def fails(cfg, pattern: str) -> str:
    with pytest.raises(ConfigError, match=pattern) as info:
        check_consistency(cfg)
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"{PARAMS}: ")  # one line, naming the file and the keys
    return text


@pytest.mark.parametrize("suite", list(SUITES))
def test_every_suite_of_params_yaml_is_consistent(suite):
    assert messages(cfg_of(suite)) == []


def test_only_selected_entries_and_what_they_read_are_checked():
    bad = {"tokenize.ucf101.train_clips_per_video": 8}  # ucf101 is not selected by the embedded suite
    assert messages(cfg_of("embedded", **bad)) == []
    assert any("tokenize.ucf101.train_clips_per_video: 8" in m for m in messages(cfg_of("ucf101", **bad)))
    use = involved(cfg_of("released"))  # the released generators read the released tokenizers and the real data
    assert use["train_tokenizer"] == ["released_ucf", "released_k600"] and use["real_stats"] == ["ucf101", "k600"]
    assert use["download"] == ["ucf101", "k600"] and use["train_generator"] == ["released_ucf_nbp16", "released_k600_nbp16"]
    # an explicit selection instead of the run section
    with pytest.raises(ConfigError, match="tokenize.ucf101"):
        check_consistency(cfg_of("embedded", **bad), {"tokenizers": ["ucf101"]})


# ---- one test per class of inconsistency ---------------------------------------------------------------


def test_device_only_a_stage_would_refuse():
    fails(cfg_of(**{"run.device": "tpu"}), r"run\.device: 'tpu' is not a device nbp runs on")
    assert messages(cfg_of(**{"run.device": "cuda:1"})) == [] and messages(cfg_of(**{"run.device": "cpu"})) == []


def test_clips_per_video_between_prepare_and_tokenize():
    cfg = cfg_of("ucf101", **{"prepare.ucf101.train_clips_per_video": 1})
    fails(cfg, r"tokenize\.ucf101\.train_clips_per_video: 4 > the 1 clips per video that "
               r"prepare\.ucf101\.train_clips_per_video keeps")


def test_resolution_against_the_tokenizer_spatial_factor():
    # 34 // 4 = 8 latent columns: the block check of load_config passes, the tokenizer would refuse the clips
    fails(cfg_of(**{"prepare.embedded.resolution": 34}),
          r"prepare\.embedded\.resolution: 34 is not divisible by the spatial factor 4 of train_tokenizer\.embedded\.preset")


def test_block_layout_against_the_latent_grid_with_tail_blocks():
    # (2, 1, 8) on 5 latent frames: 2 pairs + a 1-frame tail of 1x2x8 blocks, as BlockLayout allows
    assert messages(cfg_of(**{"train_generator.embedded_nbp.block": [2, 1, 8]})) == []
    # (3, 1, 8): the last 2 frames cannot be cut into blocks of 24 tokens on an 8x8 grid (load_config lets it pass)
    fails(cfg_of(**{"train_generator.embedded_nbp.block": [3, 1, 8]}),
          r"train_generator\.embedded_nbp\.block: .*last 2 frame\(s\) cannot be cut into blocks of 24 tokens")
    # frame prediction: the context must be whole blocks of the block's depth
    fails(cfg_of(**{"train_generator.embedded_nbp.task": "frame_pred", "train_generator.embedded_nbp.block": [2, 1, 8],
                    "train_generator.embedded_nbp.context_frames": 1}),
          r"train_generator\.embedded_nbp\.context_frames: context_frames 1 must be a multiple of the block's 2 frames")


def test_frames_against_the_temporal_factor():
    # 17 frames = 1 + 8*2, so load_config accepts temporal_factor 2; the small preset downsamples time by 4
    fails(cfg_of(**{"train_tokenizer.embedded.temporal_factor": 2}),
          r"train_tokenizer\.embedded\.temporal_factor: 2 differs from preset 'small'")
    fails(cfg_of(**{"train_tokenizer.embedded.train_frames": 8}),
          r"train_tokenizer\.embedded\.train_frames: 8 must be 1 \+ k\*4 and at most the 17 frames of prepare\.embedded")
    fails(cfg_of(**{"prepare.embedded.frames": 13}),  # 1 + 3*4, but rFVD scores 16 frames
          r"prepare\.embedded\.frames: 13 frames: eval_tokenizer\.embedded's rFVD scores the first 16")


def test_real_stats_against_the_evaluation_protocol():
    fails(cfg_of(**{"real_stats.embedded.frames": 8}), r"real_stats\.embedded\.frames: 8 frames: the I3D needs at least 9")
    fails(cfg_of(**{"real_stats.embedded.num_videos": 1}), r"real_stats\.embedded\.num_videos: 1")
    # real clips scored at more frames than the generated videos have (prepare.small keeps 21, the generator makes 17)
    other = {"prepare.small": {"dataset": "embedded", "frames": 21, "resolution": 32},
             "real_stats.small": {"dataset": "small", "frames": 20, "resolution": 32}}
    msgs = messages(cfg_of(**other, **{"eval_generator.embedded_nbp.real_stats": "small"}))
    assert msgs == ["real_stats.small.frames: 20 > the 17 frames generator 'embedded_nbp' makes "
                    "(prepare.embedded.frames; eval_generator.embedded_nbp.real_stats)"]
    # frame prediction encodes the real clips' first frames with the generator's tokenizer: same size needed
    other = {"prepare.wide": {"dataset": "embedded", "resolution": 64}, "real_stats.wide": {"dataset": "wide", "resolution": 64}}
    fails(cfg_of(**other, **{"train_generator.embedded_nbp.task": "frame_pred",
                             "eval_generator.embedded_nbp.real_stats": "wide"}),
          r"eval_generator\.embedded_nbp\.real_stats: frame prediction encodes the first 5 frames of real_stats\.wide's "
          r"clips \(17x64, prepare\.wide\) with tokenizer 'embedded', trained on 32x32")
    # class labels drawn from a dataset with more classes than the generator knows
    other = {"download.many": {"source": "embedded", "embedded": {"classes": 12}},
             "prepare.many": {"dataset": "many", "resolution": 32}, "real_stats.many": {"dataset": "many", "resolution": 32}}
    fails(cfg_of(**other, **{"eval_generator.embedded_nbp.real_stats": "many"}),
          r"eval_generator\.embedded_nbp\.real_stats: labels are drawn from prepare\.many \(12 classes\), generator "
          r"'embedded_nbp' knows 8")


def test_checks_leave_the_default_device_alone():
    list(problems(cfg_of(**{"train_tokenizer.embedded.disc_layers": 4})))
    check = problems(cfg_of(**{"train_tokenizer.embedded.disc_layers": 4}))
    next(check)  # suspended right after the discriminator problem
    assert torch.empty(1).device.type == "cpu"


def test_values_only_a_stage_checks_today():
    fails(cfg_of(**{"train_tokenizer.embedded.disc_start": 100}),
          r"train_tokenizer\.embedded\.disc_start: 100 falls inside the image warm-up")
    fails(cfg_of(**{"train_tokenizer.embedded.disc_layers": 4}),
          r"train_tokenizer\.embedded\.disc_layers: frame2d discriminator with 4 layers does not fit the 32x32 frames")
    fails(cfg_of(**{"train_tokenizer.embedded.channels": 12, "train_tokenizer.embedded.norm": "frame"}),
          r"train_tokenizer\.embedded\.channels: preset 'small': .*not divisible by norm_groups 8")
    fails(cfg_of(**{"train_generator.embedded_nbp.grad_accum": 3}),
          r"train_generator\.embedded_nbp\.batch_size: 4 is not divisible by train_generator\.embedded_nbp\.grad_accum 3")
    fails(cfg_of(**{"train_generator.embedded_nbp.task": "hybrid"}),
          r"train_generator\.embedded_nbp\.task: 'hybrid' needs the UCF-101 class names .* from a 'embedded' dataset")
    fails(cfg_of("ucf101", **{"download.ucf101.urls": {"videos": "https://example.com/UCF101.rar"}}),
          r"download\.ucf101\.urls: the ucf101 source needs urls\.splits")


def test_clip_counts_params_fix_against_batch_and_fvd():
    # 8 classes x 96 training videos x 2 clips = 1536 at most; max_videos.train 3 -> 6 clips for a batch of 8
    fails(cfg_of(**{"prepare.embedded.max_videos": {"train": 3}}),
          r"train_tokenizer\.embedded\.batch_size: 8 is more than the at most 6 training clips of prepare\.embedded")
    assert messages(cfg_of(**{"prepare.embedded.max_videos": {"train": 4}})) == []  # 8 clips: a batch of 8 fits
    fails(cfg_of(**{"prepare.embedded.max_videos": {"val": 1}}),
          r"prepare\.embedded\.max_videos: at most 1 val clip\(s\): eval_tokenizer\.embedded's rFVD needs at least 2")


def test_local_dataset_root_must_hold_the_layout(tmp_path):
    fails(cfg_of("k600", **{"download.k600.root": str(tmp_path / "nowhere")}), r"download\.k600\.root: .*nowhere: no such folder")
    fails(cfg_of("k600", **{"download.k600.root": str(tmp_path)}),
          r"download\.k600\.root: .*not a k600 layout \(missing k600/annotations\)")
    (tmp_path / "k600" / "annotations").mkdir(parents=True)
    assert messages(cfg_of("k600", **{"download.k600.root": str(tmp_path)})) == []


def test_lpips_weights_needed_but_not_obtainable(monkeypatch, tmp_path):
    from nbp.metrics.lpips_weights import run_fetch_lpips

    out = {"run.out": str(tmp_path / "out")}
    cfg = cfg_of(**out, **{"train_tokenizer.embedded.perceptual": "lpips"})
    assert messages(cfg) == []  # fetch_lpips, upstream of train_tokenizer, fetches them for the selected entries
    assert ("lpips", "fetch_lpips") in {(u.role, u.stage) for u in dag.BY_NAME["train_tokenizer"].upstream}
    # a local file named in params that is not there
    fails(cfg_of(**out, **{"train_tokenizer.embedded.perceptual": "lpips", "fetch_lpips.vgg_path": str(tmp_path / "v.pth")}),
          r"fetch_lpips\.vgg_path: .*v\.pth: no such file \(LPIPS is needed by train_tokenizer\.embedded\.perceptual: lpips")
    fails(cfg_of("ucf101", **out, **{"fetch_lpips.lin_path": str(tmp_path / "l.pth")}), r"fetch_lpips\.lin_path: .*l\.pth")
    assert messages(cfg_of(**out, **{"fetch_lpips.vgg_path": str(tmp_path / "v.pth")})) == []  # nothing needs LPIPS
    # the environment overrides, so a missing file there is an error
    monkeypatch.setenv("NBP_LPIPS_VGG", str(tmp_path / "missing.pth"))
    fails(cfg, r"train_tokenizer\.embedded\.perceptual: 'lpips': NBP_LPIPS_VGG=.*missing\.pth does not exist")
    monkeypatch.delenv("NBP_LPIPS_VGG")
    # an entry outside run.tokenizers (`nbp train_tokenizer ucf101` with the embedded run selected): not fetched for
    with pytest.raises(ConfigError, match=r"train_tokenizer\.ucf101\.perceptual: 'lpips': fetch_lpips fetches .* only "
                                          r"for the entries of run\.tokenizers, and 'ucf101' is not one"):
        check_consistency(cfg_of(**out), {"datasets": ["ucf101"], "tokenizers": ["ucf101"]})
    # made when nothing needed LPIPS, with the same params: DVC and Snakemake would not remake it
    run_fetch_lpips(cfg_of(**out))
    fails(cfg, r"train_tokenizer\.embedded\.perceptual: 'lpips': .*fetch_lpips holds no weights \(made when nothing "
               r"selected needed them.*\) and its params are unchanged, so DVC and Snakemake will not remake it: delete "
               r".*fetch_lpips")
    # params that differ (another selection, another fetch_lpips setting): the runners remake it
    assert messages(cfg_of(**out, **{"train_tokenizer.embedded.perceptual": "lpips", "fetch_lpips.for_eval": "always"})) == []
    # a released tokenizer trains nothing: no LPIPS needed
    assert not any("released_ucf" in m for m in messages(cfg_of("released")))


def test_i3d_weights_needed_but_not_obtainable(tmp_path, monkeypatch):
    fails(cfg_of(**{"fetch_detector.path": str(tmp_path / "i3d.ckpt")}), r"fetch_detector\.path: .*i3d\.ckpt: no such file")
    fails(cfg_of(**{"train_tokenizer.embedded.perceptual": "i3d", "train_tokenizer.embedded.i3d_weights": str(tmp_path / "w")}),
          r"train_tokenizer\.embedded\.i3d_weights: .*w: no such file")
    # without i3d_weights the loss reads fetch_detector's file, an upstream output of train_tokenizer in the DAG
    assert ("detector", "fetch_detector") in {(u.role, u.stage) for u in dag.BY_NAME["train_tokenizer"].upstream}
    assert messages(cfg_of(**{"train_tokenizer.embedded.perceptual": "i3d", "run.out": str(tmp_path / "out")})) == []


# ---- released entries whose file is local ------------------------------------------------------------------


def _released_generator_file(path, vocab=None):
    from test_released_generator import NH, NL, NPOS, B, C, V, _released_state

    vocab = vocab or V
    args = argparse.Namespace(n_layer=NL, n_head=NH, n_embd=C, vocab_size=vocab, block_size=NPOS, resolution=32,
                              sequence_length=9, semi_ar=True, token_number_per_step=B)
    torch.save({"state_dict": _released_state(vocab, 0), "hyper_parameters": {"args": args}}, path)
    return path


def test_released_generator_sizes_against_the_entry(tmp_path):
    path = str(_released_generator_file(tmp_path / "k600.ckpt"))  # 40 codes, grid 3x4x4, blocks of 4
    key = "train_generator.released_k600_nbp16"
    fails(cfg_of("released", **{f"{key}.checkpoint": str(tmp_path / "none.ckpt")}),
          rf"{key}\.checkpoint: .*none\.ckpt: no such file")
    fails(cfg_of("released", **{f"{key}.checkpoint": path}), rf"{key}\.checkpoint: .*trained with blocks of 4 tokens, not 16")
    fails(cfg_of("released", **{f"{key}.checkpoint": path, f"{key}.block": [1, 1, 4]}),
          rf"{key}\.checkpoint: .*k600\.ckpt: latent grid \[3, 4, 4\], tokenizer 'released_k600' on prepare\.k600 makes "
          r"\[5, 16, 16\]")
    small = {f"{key}.block": [1, 1, 4], "prepare.k600_9x32": {"dataset": "k600", "frames": 9, "resolution": 32},
             "train_tokenizer.released_k600.dataset": "k600_9x32"}  # the released tokenizer on clips of the file's grid
    fails(cfg_of("released", **{f"{key}.checkpoint": path, **small}),
          rf"{key}\.checkpoint: .*k600\.ckpt: 40 video codes, tokenizer 'released_k600' has 64000")
    full = str(_released_generator_file(tmp_path / "k600_64k.ckpt", vocab=64000))
    msgs = messages(cfg_of("released", **{f"{key}.checkpoint": full, **small}))
    assert not any(key in m for m in msgs)  # consistent (the 9-frame clips are too short for FVD: other problems)
    assert "prepare.k600_9x32.frames: 9 frames: eval_tokenizer.released_k600's rFVD scores the first 16" in msgs


def test_released_tokenizer_file_against_the_entry(tmp_path):
    import dataclasses

    from nbp.tokenizer.model import PRESETS, VideoTokenizer
    from nbp.tokenizer.released import to_released_state_dict

    key = "train_tokenizer.released_k600"
    narrow = VideoTokenizer(dataclasses.replace(PRESETS["base"], channels=32))
    torch.save({"model_state_dict": to_released_state_dict(narrow)}, tmp_path / "magvit2.pt")
    assert messages(cfg_of("released", **{f"{key}.checkpoint": str(tmp_path / "magvit2.pt")})) == []
    fails(cfg_of("released", **{f"{key}.preset": "small"}),  # known without the file
          rf"{key}\.preset: 'small', but a released tokenizer is the 'base' architecture")
    gen = _released_generator_file(tmp_path / "gen.ckpt")  # a generator given as the tokenizer
    fails(cfg_of("released", **{f"{key}.checkpoint": str(gen)}), rf"{key}\.checkpoint: .*not a released tokenizer")
    state = to_released_state_dict(narrow)
    last = max(int(k.split(".")[2]) for k in state if k.startswith("module.encoder_layers."))
    state[f"module.encoder_layers.{last}.weight"] = torch.zeros(4, 128, 1, 1, 1)  # 4 latent channels, not 6
    torch.save({"model_state_dict": state}, tmp_path / "four.pt")
    fails(cfg_of("released", **{f"{key}.checkpoint": str(tmp_path / "four.pt")}),
          rf"{key}\.checkpoint: .*four\.pt: 4 latent channels, the released FSQ has 6 levels")
    fails(cfg_of("released", **{f"{key}.checkpoint": str(tmp_path / "none.pt")}), rf"{key}\.checkpoint: .*none\.pt: no such file")
