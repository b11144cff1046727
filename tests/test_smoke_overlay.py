"""`nbp smoke SUITE` shrinks a paper suite in size only: every entry's resolved config, key by key, differs from
the paper's params only in the size keys (and the tables' smoke label), and the generator's size overrides reach the
model, its checkpoint config and the up-front checks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nbp import smoke
from nbp.config import load_config, to_dict
from nbp.generator.model import GPT, gpt_config
from nbp.suites import SUITES

ROOT = Path(__file__).resolve().parents[1]
PAPER_SUITES = ("ucf101", "k600", "k600_ablations", "released")
SECTIONS = ("download", "prepare", "real_stats", "train_tokenizer", "eval_tokenizer", "tokenize", "train_generator",
            "eval_generator")


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory) -> dict[str, tuple[object, object]]:
    """suite -> (paper config with the suite selected, the same after `nbp smoke SUITE`), from the committed params."""
    out = {}
    for suite in PAPER_SUITES:
        d = tmp_path_factory.mktemp(suite)
        paper, small = d / "paper.yaml", d / "smoke.yaml"
        shutil.copy(ROOT / "params.yaml", small)
        smoke.smoke(small, suite)
        shutil.copy(ROOT / "params.yaml", paper)
        smoke.select(paper, suite)
        out[suite] = (load_config(paper), load_config(small))
    return out


@pytest.mark.parametrize("suite", PAPER_SUITES)
def test_the_overlay_changes_size_keys_only(shrunk, suite):
    paper, small = shrunk[suite]
    assert to_dict(small.run) == to_dict(paper.run)  # the suite's run lists, seed, device: untouched
    assert {k: list(v) for k, v in SUITES[suite][1].items()} == {k: getattr(small.run, k) for k in SUITES[suite][1]}
    changed = set()
    for section in SECTIONS:
        a, b = getattr(paper, section), getattr(small, section)
        assert a.keys() == b.keys(), section
        for name in a:
            da, db = to_dict(a[name]), to_dict(b[name])
            for key in da:
                if da[key] != db[key]:
                    assert key in smoke.SIZE_KEYS.get(section, {}), f"{section}.{name}.{key}: {da[key]} -> {db[key]}"
                    changed.add((section, name, key))
    for section in ("fetch_detector", "fetch_lpips"):
        assert to_dict(getattr(small, section)) == to_dict(getattr(paper, section)), section
    assert to_dict(small.tables) == {**to_dict(paper.tables), "smoke": True}  # the one label key
    assert changed, "nothing shrunk"


@pytest.mark.parametrize("suite", PAPER_SUITES)
def test_every_selected_entry_is_shrunk_and_the_paper_recipe_stays(shrunk, suite):
    paper, small = shrunk[suite]
    for g in small.run.generators:
        p, s = paper.train_generator[g], small.train_generator[g]
        assert (p.task, p.block, p.preset, p.strategy, p.seed, p.lr, p.betas) == (s.task, s.block, s.preset, s.strategy,
                                                                                  s.seed, s.lr, s.betas)
        if s.source == "train":
            depth = {"base": 2, "xl": 3, "3b": 4}[p.preset]  # base < xl < 3b stay apart in the tables
            assert (s.steps, s.batch_size, s.n_layer, s.n_head, s.n_embd) == (2, 2, depth, 2, 64), g
            assert s.warmup_steps == 1  # 5000 or 10000 of 100000 steps -> at least one of 2
        else:
            assert s.n_layer is None  # a released file fixes its own sizes
        pe, se = paper.eval_generator[g], small.eval_generator[g]
        assert (pe.top_k, pe.top_p, pe.seeds, pe.temperature) == (se.top_k, se.top_p, se.seeds, se.temperature)
        assert se.num_videos == 2
    for t in small.run.tokenizers:
        p, s = paper.train_tokenizer[t], small.train_tokenizer[t]
        keep = ("perceptual", "disc", "ema", "lecam_weight", "recon_loss", "preset", "lr", "source", "checkpoint")
        assert [getattr(p, k) for k in keep] == [getattr(s, k) for k in keep]
        if s.source == "train":
            # the discriminator from step 1 of 2 (50k of 200k rounds to 0 steps; a positive start stays >= 1)
            assert (s.steps, s.disc_start, s.channels, s.res_blocks) == (2, 1, 32, 1)
    for d in small.run.datasets:
        p, s = paper.prepare[d], small.prepare[d]
        assert (p.frames, p.fps, p.resolution) == (s.frames, s.fps, s.resolution)  # 5x16x16 latents: every layout
    for name, d in small.download.items():
        p = paper.download[name]
        assert (d.source, d.urls, d.splits, d.root, d.keep_archives) == (p.source, p.urls, p.splits, p.root, p.keep_archives)
        # K600: the first archive of each split's list, for a download the suite reads; nothing else gets the key
        read = name in {small.prepare[e].dataset for e in small.run.datasets}
        assert d.max_archives == ({"train": 1, "val": 1} if d.source == "k600" and read else p.max_archives), name


def test_k600_download_is_shrunk_to_one_archive_per_split_keeping_a_smaller_limit(tmp_path):
    path = tmp_path / "params.yaml"
    text = (ROOT / "params.yaml").read_text()
    assert text.count("    splits: [train, val]\n") == 1
    path.write_text(text.replace("    splits: [train, val]\n", "    splits: [train, val]\n    max_archives: {val: 0}\n"))
    values = smoke.smoke(path, "k600")
    assert values[("download", "k600", "max_archives")] == {"train": 1, "val": 0}
    assert [k for k in values if k[0] == "download"] == [("download", "k600", "max_archives")]  # not ucf101's
    assert load_config(path).download["k600"].max_archives == {"train": 1, "val": 0}


def test_the_edit_keeps_comments_and_anchors(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    smoke.smoke(path, "k600_ablations")
    text = path.read_text()
    assert "&k600_gen" in text and "<<: *k600_gen" in text
    assert "# Figure 7: block sizes 8/32/64/256" in text
    assert "path: null  # a local i3d-kinetics-400.ckpt" in text


def test_scaled_step_keys():
    assert smoke._scaled(50000, 200000, 4) == 1
    assert smoke._scaled(0, 200000, 4) == 0
    assert smoke._scaled(150, 1000, 4) == 1
    assert smoke._scaled(900, 1000, 4) == 3  # at most steps - 1: the discriminator still trains


def test_generator_size_overrides_reach_the_model_and_checkpoint_config():
    cfg = gpt_config("base", n_layer=2, n_head=2, n_embd=64, vocab_size=100, n_positions=32)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (2, 2, 64)
    model = GPT(cfg)
    assert len(model.blocks) == 2
    assert cfg.to_dict()["n_embd"] == 64  # the checkpoint's self-describing config
    assert gpt_config("base", n_layer=None, vocab_size=100).n_layer == 24  # None: the preset's


def test_tokenizer_depth_override_sets_every_level():
    from nbp.tokenizer.model import PRESETS, preset

    cfg = preset("base", channels=32, res_blocks=1)
    assert (cfg.channels, cfg.enc_res, cfg.dec_res) == (32, (1, 1, 1, 1), (1, 1, 1, 1))
    assert cfg.channel_mult == PRESETS["base"].channel_mult and cfg.levels == PRESETS["base"].levels
    assert preset("base").enc_res == PRESETS["base"].enc_res


def test_a_bad_size_override_is_one_line_from_nbp_check(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    smoke.smoke(path, "ucf101")
    text = path.read_text()
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("ucf_base_nbp16: &ucf_gen"))
    path.write_text(text.replace(line, line.replace("n_embd: 64", "n_embd: 65")))
    res = subprocess.run([sys.executable, "-m", "nbp", "check", "--params", str(path)], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"nbp: error: {path}: train_generator.ucf_base_nbp16.n_embd: n_embd 65 is not a multiple of n_head 2 "
        "(preset 'base' with train_generator.ucf_base_nbp16.n_layer / n_head / n_embd)"]
