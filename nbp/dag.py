"""The pipeline's DAG, described once.

``STAGES`` below says, for every stage: which ``run`` list selects its entries, the code it runs, the
outputs of other stages it reads, the params keys it depends on, what it writes (outputs, metrics,
plots) and whether training may be launched on several GPUs. From it:

- ``dvc.yaml`` is generated (``nbp dag --write``; a test checks the committed file is current). It is
  templated: ``foreach: ${run.tokenizers}`` etc., so the ``run`` section of params.yaml (also through
  ``dvc exp run -S run.generators=[...]``) selects what runs.
- the Snakefile (``workflow/rules/*.smk``) imports this module for the same inputs, outputs, params
  and commands, resolved for the selected entries, and for per-entry cluster resources.

One difference is forced by DVC's templating, which cannot look a value up by the loop item
(``${train_generator.${item}.tokens}`` is not allowed): when a stage reads an entry of *another*
family (a generator reads the tokens of its ``tokens`` entry), dvc.yaml depends on the upstream
stage's whole folder (``out/tokenize``) while Snakemake depends on the exact entry
(``out/tokenize/embedded``). With one dataset and one tokenizer selected they are the same DAG; with
several, DVC may rerun more than needed, never less. Inside a family (``prepare@ucf101`` reads
``download@ucf101``) both are exact; :func:`check_wiring` enforces the same-name rule that makes it so.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nbp.config import Config, ConfigError
from nbp.errors import NbpError

ROOT = Path(__file__).resolve().parent.parent
DVC_YAML = ROOT / "dvc.yaml"

# run list -> the stage sections whose entries it selects (by name)
FAMILIES = {
    "datasets": ("download", "prepare", "real_stats"),
    "tokenizers": ("train_tokenizer", "eval_tokenizer", "tokenize"),
    "generators": ("train_generator", "eval_generator"),
}
DETECTOR = "i3d-kinetics-400.ckpt"
# Code dependencies. Not tracked (they cannot change a stage's outputs): the CLI and package entry points
# (nbp/__init__.py, nbp/__main__.py, nbp/cli.py), error types (nbp/errors.py), progress bars and W&B (nbp/tracking.py).
# tests/test_pipeline_e2e.py records the nbp modules each stage really imports and checks they are covered.
UNTRACKED_CODE = ("nbp/__init__.py", "nbp/__main__.py", "nbp/cli.py", "nbp/errors.py", "nbp/tracking.py")
COMMON_CODE = ("nbp/config.py", "nbp/io.py")
TRAIN_CODE = ("nbp/checkpoint.py", "nbp/distributed.py")


# --------------------------------------------------------------------------------------
# references between entries (params fields that name an entry of another section)


def _tok_dataset(cfg: Config, tok: str) -> str:
    return cfg.train_tokenizer[tok].dataset


def _gen_tokens(cfg: Config, gen: str) -> str:
    return cfg.train_generator[gen].tokens


def _gen_tokenizer(cfg: Config, gen: str) -> str:
    return cfg.tokenize[cfg.train_generator[gen].tokens].tokenizer


def _gen_real_stats(cfg: Config, gen: str) -> str:
    return cfg.eval_generator[gen].real_stats


@dataclass(frozen=True)
class Upstream:
    """Outputs of another stage that a stage reads.

    ``files``: paths inside the upstream entry's folder (``()``: the folder itself, a directory output).
    ``via``: for an entry of another family, how to find its name from this entry's params
    (``None``: the same name, or the upstream stage is global). ``fan_in``: a global stage reading the
    output of every selected entry of the upstream stage.
    """

    stage: str
    files: tuple[str, ...] = ()
    via: Callable[[Config, str], str] | None = None
    via_key: str = ""  # the params field behind `via`, for the docs (e.g. "train_generator.{entry}.tokens")
    fan_in: bool = False


@dataclass(frozen=True)
class Stage:
    name: str
    family: str | None  # the run list that selects its entries; None: one global instance
    code: tuple[str, ...]
    upstream: tuple[Upstream, ...] = ()
    params: tuple[str, ...] = ()  # params keys; "{entry}" is the entry name
    outs: tuple[str, ...] = ("",)  # inside the stage's folder; "": the folder itself
    metrics: tuple[str, ...] = ()
    plots: tuple[tuple[str, dict], ...] = ()
    cache: bool = True  # DVC caches the outs (False: data folders too large to copy into .dvc/cache)
    launch: str = "single"  # "torchrun": may run on several GPUs (training)
    root: str = "run.out"  # params key of the folder the outputs live under
    desc: str = ""

    @property
    def is_global(self) -> bool:
        return self.family is None


STAGES: tuple[Stage, ...] = (
    Stage("download", "datasets", ("nbp/data",), params=("download.{entry}",), cache=False,
          desc="fetch (or generate, for the embedded set) a dataset in its source layout"),
    Stage("fetch_detector", None, ("nbp/metrics/__init__.py", "nbp/metrics/detector.py"), params=("fetch_detector",),
          outs=(DETECTOR,),
          desc="the I3D weights for FVD, sha256-checked"),
    Stage("prepare", "datasets", ("nbp/data",), (Upstream("download"),), ("prepare.{entry}",), cache=False,
          desc="decode and resize clips once into a uint8 clip cache"),
    Stage("real_stats", "datasets", ("nbp/metrics", "nbp/data", "nbp/distributed.py"),
          (Upstream("prepare"), Upstream("fetch_detector", (DETECTOR,))), ("real_stats.{entry}",),
          desc="I3D feature statistics of real clips (the FVD reference)"),
    Stage("train_tokenizer", "tokenizers", ("nbp/tokenizer", "nbp/data", "nbp/metrics") + TRAIN_CODE,
          (Upstream("prepare", via=_tok_dataset, via_key="train_tokenizer.{entry}.dataset"),),
          ("train_tokenizer.{entry}",), outs=("tokenizer.pt",), metrics=("metrics.json",),
          plots=(("history.csv", {"x": "step", "y": "loss"}),), launch="torchrun",
          desc="train (or import) a video tokenizer"),
    Stage("eval_tokenizer", "tokenizers", ("nbp/tokenizer", "nbp/metrics", "nbp/data") + TRAIN_CODE,
          (Upstream("train_tokenizer", ("tokenizer.pt",)),
           Upstream("prepare", via=_tok_dataset, via_key="train_tokenizer.{entry}.dataset"),
           Upstream("fetch_detector", (DETECTOR,))),
          ("eval_tokenizer.{entry}",), outs=("recon.mp4", "recon.gif"), metrics=("metrics.json",),
          desc="rFVD, PSNR, SSIM, codebook usage of a tokenizer"),
    Stage("tokenize", "tokenizers", ("nbp/generator/__init__.py", "nbp/generator/data.py", "nbp/generator/tokenize.py",
                                  "nbp/tokenizer", "nbp/data") + TRAIN_CODE,
          (Upstream("train_tokenizer", ("tokenizer.pt",)),
           Upstream("prepare", via=_tok_dataset, via_key="train_tokenizer.{entry}.dataset")),
          ("tokenize.{entry}",), cache=False,
          desc="encode the clip cache into token shards once"),
    Stage("train_generator", "generators", ("nbp/generator", "nbp/data") + TRAIN_CODE,
          (Upstream("tokenize", via=_gen_tokens, via_key="train_generator.{entry}.tokens"),),
          ("train_generator.{entry}",), outs=("generator.pt",), metrics=("metrics.json",),
          plots=(("history.csv", {"x": "step", "y": "val_loss"}),), launch="torchrun",
          desc="train (or import) an NBP / NTP generator"),
    Stage("eval_generator", "generators", ("nbp/generator", "nbp/tokenizer", "nbp/metrics", "nbp/data") + TRAIN_CODE,
          (Upstream("train_generator", ("generator.pt",)),
           Upstream("tokenize", via=_gen_tokens, via_key="train_generator.{entry}.tokens"),
           Upstream("train_tokenizer", ("tokenizer.pt",), via=_gen_tokenizer, via_key="tokenize.<tokens>.tokenizer"),
           Upstream("real_stats", via=_gen_real_stats, via_key="eval_generator.{entry}.real_stats"),
           Upstream("fetch_detector", (DETECTOR,))),
          ("eval_generator.{entry}",), outs=("samples.mp4", "samples.gif"), metrics=("metrics.json",),
          desc="sample videos; gFVD, steps, frames per second"),
    Stage("tables", None, ("nbp/tables.py",),
          (Upstream("eval_tokenizer", ("metrics.json", "recon.gif"), fan_in=True),
           Upstream("eval_generator", ("metrics.json", "samples.gif"), fan_in=True)),
          ("tables", "download", "prepare", "train_tokenizer", "eval_tokenizer", "tokenize", "train_generator",
           "eval_generator"),
          outs=("tokenizer.md", "tokenizer.csv", "main.md", "main.csv", "ntp_vs_nbp.md", "ntp_vs_nbp.csv",
                "block_size.md", "block_size.csv", "block_size_plot.csv", "block_size.png", "block_shape.md",
                "block_shape.csv", "README.md", "samples"),
          cache=False, root="tables.out", desc="gather metrics into the paper's tables in results/"),
)
BY_NAME = {s.name: s for s in STAGES}

# DVC top-level plots (static paths under tables.out; the Snakemake side has no equivalent)
BLOCK_SIZE_PLOTS = {
    "fps_vs_block_size": ("fps", "frames per second"),
    "fvd_vs_block_size": ("fvd", "FVD"),
}
PLOT_SERIES = ("paper_k600", "ours_k600", "ours_embedded")


# --------------------------------------------------------------------------------------
# selection and wiring


def selected(cfg: Config, stage: str) -> list[str]:
    """Entries of ``stage`` the ``run`` section selects (``[]`` for a global stage)."""
    s = BY_NAME[stage]
    return [] if s.is_global else list(getattr(cfg.run, s.family))


def check_wiring(cfg: Config) -> None:
    """The rules that let dvc.yaml select entries by name: every name in a ``run`` list is an entry of
    each stage of its family, and references inside a family name the entry itself."""
    src = cfg.params_file
    for family, stages in FAMILIES.items():
        for name in getattr(cfg.run, family):
            for stage in stages:
                if name not in getattr(cfg, stage):
                    raise ConfigError(f"run.{family}", f"{name!r} has no `{stage}` entry (each of {', '.join(stages)} "
                                      f"needs an entry named {name!r})", src)
    same = (("prepare", "dataset", "datasets"), ("real_stats", "dataset", "datasets"),
            ("eval_tokenizer", "tokenizer", "tokenizers"), ("tokenize", "tokenizer", "tokenizers"),
            ("eval_generator", "generator", "generators"))
    for stage, fieldname, family in same:
        for name in getattr(cfg.run, family):
            ref = getattr(getattr(cfg, stage)[name], fieldname)
            if ref != name:
                raise ConfigError(f"{stage}.{name}.{fieldname}", f"must be {name!r} (the pipeline pairs `{stage}` entries "
                                  f"with the {family} entry of the same name), got {ref!r}", src)
    for stage in ("train_tokenizer", "tokenize", "train_generator", "eval_generator"):
        for name in selected(cfg, stage):
            for up in BY_NAME[stage].upstream:
                if up.via is not None:
                    ref = up.via(cfg, name)
                    fam = BY_NAME[up.stage].family
                    if ref not in getattr(cfg.run, fam):
                        raise ConfigError(f"run.{fam}", f"{ref!r} is needed by `{stage}.{name}` "
                                          f"({up.via_key.format(entry=name)}) but not selected", src)


# --------------------------------------------------------------------------------------
# paths


def _root(cfg: Config, stage: Stage) -> str:
    return cfg.tables.out if stage.root == "tables.out" else cfg.run.out


def folder(cfg: Config, stage: str, entry: str | None) -> str:
    """``{run.out}/{stage}/{entry}`` (``{run.out}/{stage}`` for a global stage; ``tables.out`` for tables)."""
    s = BY_NAME[stage]
    if s.root == "tables.out":
        return _root(cfg, s)
    base = f"{_root(cfg, s)}/{stage}"
    return base if s.is_global else f"{base}/{entry}"


def _join(base: str, rel: str) -> str:
    return f"{base}/{rel}" if rel else base


def outputs(cfg: Config, stage: str, entry: str | None) -> dict[str, list[str]]:
    """``{"outs": [...], "metrics": [...], "plots": [...]}`` of one stage instance."""
    s, base = BY_NAME[stage], folder(cfg, stage, entry)
    return {"outs": [_join(base, o) for o in s.outs], "metrics": [_join(base, m) for m in s.metrics],
            "plots": [_join(base, p) for p, _ in s.plots]}


def all_outputs(cfg: Config, stage: str, entry: str | None) -> list[str]:
    o = outputs(cfg, stage, entry)
    return o["outs"] + o["metrics"] + o["plots"]


def is_dir_output(stage: str, rel: str) -> bool:
    return rel == "" or (stage == "tables" and rel == "samples")


def code_files(paths: tuple[str, ...], root: Path = ROOT) -> list[str]:
    """The files behind code deps (a folder: every file under it but caches), relative to ``root``."""
    out = []
    for p in paths:
        full = root / p
        if full.is_dir():
            out += sorted(str(f.relative_to(root)) for f in full.rglob("*")
                          if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc")
        else:
            out.append(p)
    return out


def code_deps(stage: str) -> tuple[str, ...]:
    return COMMON_CODE + BY_NAME[stage].code


def inputs(cfg: Config, stage: str, entry: str | None, root: Path = ROOT) -> list[str]:
    """Every file or folder one stage instance reads (code files, then upstream outputs), exact entries."""
    s = BY_NAME[stage]
    files = code_files(code_deps(stage), root)
    for up in s.upstream:
        us = BY_NAME[up.stage]
        if us.is_global:
            names = [None]
        elif up.fan_in:
            names = selected(cfg, up.stage)
        elif up.via is not None:
            names = [up.via(cfg, entry)]
        else:
            names = [entry]
        for n in names:
            base = folder(cfg, up.stage, n)
            files += [_join(base, f) for f in up.files] if up.files else [base]
    return files


def params_keys(stage: str, entry: str | None) -> list[str]:
    return [k.format(entry=entry) for k in BY_NAME[stage].params]


def params_values(raw: dict, stage: str, entry: str | None) -> str:
    """The values of a stage instance's params keys as one JSON string (Snakemake's params trigger)."""
    out = {}
    for key in params_keys(stage, entry):
        node: Any = raw
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return json.dumps(out, sort_keys=True, default=str)


def command(stage: str, entry: str | None, launcher: str = "nbp") -> str:
    """The stage's command: ``nbp <stage> [entry]`` (``launcher`` replaces ``nbp`` for multi-GPU runs)."""
    return f"{launcher} {stage}" + ("" if entry is None else f" {entry}")


# --------------------------------------------------------------------------------------
# cluster resources and the multi-GPU launcher


GPU_STAGES = ("real_stats", "train_tokenizer", "eval_tokenizer", "tokenize", "train_generator", "eval_generator")

# minutes / MiB / cores / GPUs for paper-scale entries; the embedded experiment and tests use SMALL
SMALL = {"runtime": 30, "mem_mb": 8000, "cpus_per_task": 2, "gpu": 0}
PAPER: dict[str, dict[str, int]] = {
    "download": {"runtime": 1440, "mem_mb": 8000, "cpus_per_task": 4, "gpu": 0},
    "fetch_detector": {"runtime": 30, "mem_mb": 2000, "cpus_per_task": 1, "gpu": 0},
    "prepare": {"runtime": 1440, "mem_mb": 64000, "cpus_per_task": 16, "gpu": 0},
    "real_stats": {"runtime": 720, "mem_mb": 64000, "cpus_per_task": 8, "gpu": 1},
    "train_tokenizer": {"runtime": 4320, "mem_mb": 256000, "cpus_per_task": 32, "gpu": 8},
    "eval_tokenizer": {"runtime": 720, "mem_mb": 64000, "cpus_per_task": 8, "gpu": 1},
    "tokenize": {"runtime": 720, "mem_mb": 64000, "cpus_per_task": 8, "gpu": 1},
    "train_generator": {"runtime": 4320, "mem_mb": 256000, "cpus_per_task": 32, "gpu": 8},
    "eval_generator": {"runtime": 2880, "mem_mb": 64000, "cpus_per_task": 8, "gpu": 1},
    "tables": {"runtime": 10, "mem_mb": 2000, "cpus_per_task": 1, "gpu": 0},
}
# larger generators: longer and (3B, DeepSpeed ZeRO) more host memory
PRESET_SCALE = {"xl": {"runtime": 1.5, "mem_mb": 1.0}, "3b": {"runtime": 2.5, "mem_mb": 1.9}}


def _is_paper_scale(cfg: Config, stage: str, entry: str | None) -> bool:
    """Whether an entry works on a real dataset (UCF-101 / K600) rather than the embedded one."""
    if entry is None:
        return any(d.source != "embedded" for n, d in cfg.download.items() if n in cfg.run.datasets)
    family = BY_NAME[stage].family
    if family == "datasets":
        ds = entry
    elif family == "tokenizers":
        ds = cfg.train_tokenizer[entry].dataset
    else:
        ds = cfg.train_tokenizer[_gen_tokenizer(cfg, entry)].dataset
    return cfg.download[cfg.prepare[ds].dataset].source != "embedded"


IMPORT = {"runtime": 120, "mem_mb": 32000, "cpus_per_task": 4, "gpu": 0}  # importing a released checkpoint


def resources(cfg: Config, stage: str, entry: str | None) -> dict[str, int]:
    """Slurm resources of one stage instance: runtime (min), mem_mb, cpus_per_task, gpu."""
    if stage in ("train_tokenizer", "train_generator") and getattr(cfg, stage)[entry].source == "released":
        return dict(IMPORT)
    if stage == "tables" or not _is_paper_scale(cfg, stage, entry):
        res = dict(SMALL)
        if stage == "tables":
            res.update(PAPER["tables"])
        return res
    res = dict(PAPER[stage])
    if BY_NAME[stage].family == "generators":
        scale = PRESET_SCALE.get(cfg.train_generator[entry].preset, {})
        res["runtime"] = int(res["runtime"] * scale.get("runtime", 1))
        res["mem_mb"] = int(res["mem_mb"] * scale.get("mem_mb", 1))
    return res


def launcher(stage: str, gpu: int, nodes: int = 1) -> str:
    """How to start a stage: ``nbp`` (one process), or torchrun for a training stage on several GPUs.

    ``gpu`` is the number of GPUs per node. One node: ``torchrun --standalone``. Several nodes (Slurm
    resources ``nodes`` > 1, ``mpi: srun``): one torchrun per node through ``srun``, rendezvous on the
    first node of the allocation.
    """
    if BY_NAME[stage].launch != "torchrun" or (gpu <= 1 and nodes <= 1):
        return "nbp"
    if nodes <= 1:
        return f"torchrun --standalone --nproc_per_node={gpu} -m nbp"
    return (f"srun --ntasks-per-node=1 torchrun --nnodes={nodes} --nproc_per_node={max(gpu, 1)} "
            "--rdzv_id=$SLURM_JOB_ID --rdzv_backend=c10d --rdzv_endpoint=$(hostname):29500 -m nbp")


# --------------------------------------------------------------------------------------
# dvc.yaml


def _dvc_folder(stage: str, item: str | None) -> str:
    s = BY_NAME[stage]
    if s.root == "tables.out":
        return "${tables.out}"
    base = f"${{run.out}}/{stage}"
    return base if s.is_global else f"{base}/{item}"


def _dvc_deps(s: Stage) -> list[str]:
    deps = list(COMMON_CODE + s.code)
    for up in s.upstream:
        us = BY_NAME[up.stage]
        if us.is_global:
            deps += [_join(_dvc_folder(up.stage, None), f) for f in up.files] or [_dvc_folder(up.stage, None)]
        elif up.via is not None or up.fan_in:
            coarse = f"${{run.out}}/{up.stage}"  # DVC cannot look the entry up: the whole stage folder
            if coarse not in deps:
                deps.append(coarse)
        else:
            base = _dvc_folder(up.stage, "${item}")
            deps += [_join(base, f) for f in up.files] or [base]
    return deps


def dvc_stage(s: Stage) -> dict:
    item = None if s.is_global else "${item}"
    base = _dvc_folder(s.name, item)
    body: dict[str, Any] = {"desc": s.desc, "cmd": command(s.name, item), "deps": _dvc_deps(s)}
    body["params"] = [k.replace("{entry}", "${item}") for k in s.params]
    body["outs"] = [{_join(base, o): {"cache": False}} if not s.cache else _join(base, o) for o in s.outs]
    if s.metrics:
        body["metrics"] = [{_join(base, m): {"cache": False}} for m in s.metrics]
    if s.plots:
        body["plots"] = [{_join(base, p): {"cache": False, **props}} for p, props in s.plots]
    if s.is_global:
        return body
    return {"foreach": f"${{run.{s.family}}}", "do": body}


def dvc_yaml() -> dict:
    doc: dict[str, Any] = {"stages": {s.name: dvc_stage(s) for s in STAGES}}
    plots = []
    for name, (metric, label) in BLOCK_SIZE_PLOTS.items():
        plots.append({name: {"x": "block_size", "y": {"results/block_size_plot.csv": [f"{s}_{metric}" for s in PLOT_SERIES]},
                             "title": f"{label} vs block size", "x_label": "tokens per block", "y_label": label}})
    doc["plots"] = plots
    return doc


HEADER = """\
# GENERATED from nbp/dag.py by `nbp dag --write`; do not edit by hand (a test checks it is current).
# The `run` section of params.yaml selects the entries (foreach); see README "Choosing what runs".
# A stage that reads an entry of another family depends on that stage's whole folder (e.g. out/tokenize):
# DVC's templating cannot look the entry up; Snakemake (workflow/) tracks the exact entry.
"""


def render_dvc_yaml() -> str:
    return HEADER + yaml.safe_dump(dvc_yaml(), sort_keys=False, width=130)


# --------------------------------------------------------------------------------------
# `nbp dag`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--write", action="store_true", help="write dvc.yaml (default: print it)")
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed dvc.yaml differs from the generated one")
    parser.add_argument("--list", action="store_true", help="list the stage instances the params select, with their commands")
    parser.add_argument("--params", default="params.yaml")


def main(args: argparse.Namespace) -> int:
    text = render_dvc_yaml()
    if args.list:
        from nbp.config import load_config

        cfg = load_config(args.params)
        check_wiring(cfg)
        for s in STAGES:
            for e in [None] if s.is_global else selected(cfg, s.name):
                print(f"{s.name}{'' if e is None else '@' + e}: {command(s.name, e)} -> {', '.join(all_outputs(cfg, s.name, e))}")
        return 0
    if args.check:
        current = DVC_YAML.read_text() if DVC_YAML.exists() else ""
        if current != text:
            raise NbpError(f"{DVC_YAML.name}: out of date with nbp/dag.py (run `nbp dag --write`)")
        print(f"{DVC_YAML.name}: current")
        return 0
    if args.write:
        from nbp.io import write_text

        write_text(DVC_YAML, text)
        print(f"wrote {DVC_YAML}")
        return 0
    sys.stdout.write(text)
    return 0
