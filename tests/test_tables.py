"""The tables stage: hand-written metrics in, the paper's tables out, each of our numbers in the right row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from nbp.config import load_config
from nbp.tables import run_tables

ROOT = Path(__file__).resolve().parent.parent


def _metrics(folder: Path, m: dict, gif: bytes | None = None, gif_name: str = "samples.gif") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(m))
    if gif is not None:
        (folder / gif_name).write_bytes(gif)


@pytest.fixture
def tables(tmp_path):
    p = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", p)
    cfg = load_config(p, overrides={"run.out": str(tmp_path / "out"), "tables.out": str(tmp_path / "results")})
    out = tmp_path / "out"
    _metrics(out / "eval_generator/embedded_nbp", {"gfvd": 123.4, "gfvd_std": 0.0, "gfvd_per_seed": [123.4], "steps": 40,
                                                   "fps": 5.5, "num_videos": 128, "device": "cpu (2 threads)",
                                                   "gfvd_untrained": 900.0}, gif=b"GIF89a-nbp")
    _metrics(out / "eval_generator/embedded_ntp", {"gfvd": 150.0, "gfvd_per_seed": [150.0], "steps": 320, "fps": 0.7,
                                                   "num_videos": 128, "device": "cpu (2 threads)"}, gif=b"GIF89a-ntp")
    _metrics(out / "eval_generator/k600_base_nbp16", {"gfvd": 30.04, "gfvd_std": 1.23, "gfvd_per_seed": [29, 30, 31, 30.16],
                                                      "steps": 48, "fps": 7.5, "num_videos": 50000,
                                                      "device": "cuda:0 (NVIDIA H100)"})
    _metrics(out / "eval_tokenizer/embedded", {"rfvd": 55.5, "psnr": 24.123, "ssim": 0.81234, "lpips": None,
                                               "codebook_usage": 0.5, "num_videos": 64, "device": "cpu (2 threads)"},
             gif=b"GIF89a-recon", gif_name="recon.gif")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "speed.md").write_text("benchmarks own this\n")
    run_tables(cfg)
    return tmp_path / "results", cfg


def _row(df: pd.DataFrame, **match) -> pd.Series:
    sel = df
    for k, v in match.items():
        sel = sel[sel[k].astype(str) == str(v)]
    assert len(sel) == 1, (match, sel)
    return sel.iloc[0]


def test_main_table_puts_each_run_in_its_row(tables):
    res, _ = tables
    df = pd.read_csv(res / "main.csv", dtype=str, keep_default_na=False)
    k600 = _row(df, dataset="K600", model="NBP 700M")
    assert (k600["paper FVD"], k600["paper steps"]) == ("25.5", "48")
    assert (k600["ours FVD"], k600["ours steps"]) == ("30.0 ± 1.2", "48")
    assert (k600["experiment"], k600["samples"], k600["hardware"]) == ("`k600_base_nbp16`", "50000 x 4 seeds",
                                                                       "cuda:0 (NVIDIA H100)")
    ucf = _row(df, dataset="UCF-101", model="NBP 1.2B")
    assert (ucf["paper FVD"], ucf["ours FVD"], ucf["experiment"]) == ("85.8", "not run", "`ucf_xl_nbp16`")
    assert _row(df, dataset="K600", model="NBP 700M (released weights)")["ours FVD"] == "not run"
    assert _row(df, dataset="UCF-101", model="TATS 321M")["paper FVD"] == "332.0"
    emb = _row(df, dataset="embedded (toy)", model="NBP tiny 1x1x8")
    assert (emb["ours FVD"], emb["ours steps"], emb["ours FVD, untrained model"]) == ("123.4", "40", "900.0")
    assert (emb["paper FVD"], emb["samples"], emb["hardware"]) == ("—", "128", "cpu (2 threads)")
    # toy numbers only ever appear in embedded rows
    assert not df[df["dataset"] != "embedded (toy)"].apply(lambda r: r.str.contains("123.4|150.0").any(), axis=1).any()
    md = (res / "main.md").read_text()
    assert "| K600 " in md and "30.0 ± 1.2" in md and "`k600_base_nbp16`" in md


def test_tokenizer_ntp_block_tables(tables):
    res, _ = tables
    tok = pd.read_csv(res / "tokenizer.csv", dtype=str, keep_default_na=False)
    emb = _row(tok, dataset="embedded (toy)")
    assert (emb["ours rFVD"], emb["ours PSNR"], emb["ours SSIM"], emb["ours LPIPS"]) == ("55.5", "24.12", "0.812", "—")
    assert _row(tok, dataset="UCF-101", tokenizer="trained (base)")[["paper rFVD", "ours rFVD"]].tolist() == ["15.50", "not run"]
    assert _row(tok, dataset="K600", tokenizer="released weights")["paper PSNR"] == "31.3"

    t1 = pd.read_csv(res / "ntp_vs_nbp.csv", dtype=str, keep_default_na=False)
    nbp = _row(t1, dataset="K600", size="700M", method="NBP (1x1x16)")
    assert (nbp["paper FVD"], nbp["paper FPS"], nbp["ours FVD"], nbp["ours FPS"]) == ("33.6", "8.89", "30.0 ± 1.2", "7.50")
    assert _row(t1, dataset="K600", size="3B", method="NTP (1x1x1)")["ours FVD"] == "not run"
    assert _row(t1, dataset="embedded (toy)", method="NTP (1x1x1)")["ours FPS"] == "0.70"

    shape = pd.read_csv(res / "block_shape.csv", dtype=str, keep_default_na=False)
    assert _row(shape, dataset="K600", shape="1x1x16")[["paper FVD", "ours FVD"]].tolist() == ["25.5", "30.0 ± 1.2"]
    assert _row(shape, dataset="K600", shape="2x2x2")["ours FVD"].startswith("not run")

    pts = pd.read_csv(res / "block_size_plot.csv")
    r16 = pts[pts.block_size == 16].iloc[0]
    assert (r16.paper_k600_fps, r16.paper_k600_fvd, r16.ours_k600_fvd, r16.ours_k600_fps) == (8.89, 25.5, 30.04, 7.5)
    r8 = pts[pts.block_size == 8].iloc[0]
    assert (r8.ours_embedded_fvd, r8.ours_embedded_fps) == (123.4, 5.5) and pd.isna(r8.ours_k600_fvd)
    assert sorted(pts.block_size) == [1, 8, 16, 32, 64, 256]
    assert (res / "block_size.png").read_bytes()[:4] == b"\x89PNG"


def test_samples_readme_and_reruns(tables):
    res, cfg = tables
    assert sorted(p.name for p in (res / "samples").iterdir()) == ["embedded_nbp_samples.gif", "embedded_ntp_samples.gif",
                                                                    "embedded_recon.gif"]
    assert (res / "samples" / "embedded_nbp_samples.gif").read_bytes() == b"GIF89a-nbp"
    readme = (res / "README.md").read_text()
    assert "`k600_base_nbp16`" in readme and "Table 7" in readme and "embedded (toy)" in readme
    assert (res / "speed.md").read_text() == "benchmarks own this\n"  # not ours: untouched
    shutil.rmtree(Path(cfg.run.out) / "eval_generator" / "embedded_ntp")
    run_tables(cfg)
    assert not (res / "samples" / "embedded_ntp_samples.gif").exists()
    t1 = pd.read_csv(res / "ntp_vs_nbp.csv", dtype=str, keep_default_na=False)
    assert _row(t1, dataset="embedded (toy)", method="NTP (1x1x1)")["ours FVD"] == "not run"
