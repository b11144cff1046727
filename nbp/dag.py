"""The pipeline's one registry of stages.

``STAGES`` below says, for every stage: its implementation (``module:function``) and help text, which
``run`` list selects its entries, the outputs of other stages it reads (each under a *role*), the params
keys it depends on, what it writes (outputs, metrics, plots, each under a role) and whether training may
be launched on several GPUs. Its code dependencies are computed: the nbp modules its implementation
imports, followed transitively (:func:`code_deps`). From the registry:

- ``nbp <stage> [entry]`` (``nbp/cli.py`` builds one subcommand per record);
- the resolved paths of one stage instance (:func:`resolve`), handed to ``run_<stage>(cfg, entry, paths)``:
  the same input and output paths that DVC and Snakemake see;
- ``dvc.yaml`` (``nbp dag --write``; a test checks the committed file is current). It is templated:
  ``foreach: ${run.tokenizers}`` etc., so the ``run`` section of params.yaml (also through
  ``dvc exp run -S run.generators=[...]``) selects what runs;
- the Snakemake rules (``workflow/rules/stages.smk`` makes one rule per record in a loop).

One difference is forced by DVC's templating, which cannot look a value up by the loop item
(``${train_generator.${item}.tokens}`` is not allowed): when a stage reads an entry of *another*
family (a generator reads the tokens of its ``tokens`` entry), dvc.yaml depends on the upstream
stage's whole folder (``out/tokenize``) while Snakemake depends on the exact entry
(``out/tokenize/embedded``). With one dataset and one tokenizer selected they are the same DAG; with
several, DVC may rerun more than needed, never less. Inside a family (``prepare@ucf101`` reads
``download@ucf101``) both are exact; :func:`check_wiring` enforces the same-name rule that makes it so.

Adding a stage: one :class:`Stage` record here and one ``run_<stage>(cfg, entry, paths)`` function.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from nbp.config import Config, ConfigError, load_config
from nbp.errors import NbpError
from nbp.io import write_text
from nbp.metrics import I3D_FILENAME

ROOT = Path(__file__).resolve().parent.parent
DVC_YAML = ROOT / "dvc.yaml"

# run list -> the stage sections whose entries it selects (by name)
FAMILIES = {
    "datasets": ("download", "prepare", "real_stats"),
    "tokenizers": ("train_tokenizer", "eval_tokenizer", "tokenize"),
    "generators": ("train_generator", "eval_generator"),
}
# Modules no stage output depends on: the CLI and package entry points, error types, progress bars and W&B,
# and this registry. Imports of them are not followed. tests/test_pipeline_e2e.py records the nbp modules each
# stage really imports and checks they are covered by its code deps.
UNTRACKED_CODE = ("nbp/__init__.py", "nbp/__main__.py", "nbp/cli.py", "nbp/errors.py", "nbp/tracking.py", "nbp/dag.py",
                  "nbp/validate.py")
# The stage command runs nbp.validate before the stage: it can refuse a run, never change an output, so neither it
# nor the modules only it imports are code deps (runtime_imports_allowed() tells the import-trace test).


def runtime_imports_allowed(root: Path = ROOT) -> set[str]:
    """Modules a stage process may import without them being its code deps: the untracked ones and what the
    up-front validation imports."""
    return set(UNTRACKED_CODE) | set(_closure("nbp.validate", root, follow_untracked=True))


# --------------------------------------------------------------------------------------
# references between entries (params fields that name an entry of another section)


def _tok_dataset(cfg: Config, tok: str) -> str:
    return cfg.train_tokenizer[tok].dataset


def _gen_tokens(cfg: Config, gen: str) -> str:
    return cfg.train_generator[gen].tokens


def gen_tokenizer(cfg: Config, gen: str) -> str:
    """The ``train_tokenizer`` entry behind a generator (through its ``tokens`` entry)."""
    return cfg.tokenize[cfg.train_generator[gen].tokens].tokenizer


def _gen_real_stats(cfg: Config, gen: str) -> str:
    return cfg.eval_generator[gen].real_stats


def _gen_real_clips(cfg: Config, gen: str) -> str:
    """The clip cache behind a generator's FVD reference (class labels and K600 context frames come from it)."""
    return cfg.real_stats[_gen_real_stats(cfg, gen)].dataset


@dataclass(frozen=True)
class Upstream:
    """Outputs of another stage that a stage reads, under ``role``.

    ``files``: paths inside the upstream entry's folder (``()``: the folder itself, a directory output).
    ``via``: for an entry of another family, how to find its name from this entry's params
    (``None``: the same name, or the upstream stage is global). ``fan_in``: a global stage reading the
    output of every selected entry of the upstream stage.
    """

    role: str
    stage: str
    files: tuple[str, ...] = ()
    via: Callable[[Config, str], str] | None = None
    via_key: str = ""  # the params field behind `via`, for the docs (e.g. "train_generator.{entry}.tokens")
    fan_in: bool = False


@dataclass(frozen=True)
class Stage:
    name: str
    family: str | None  # the run list that selects its entries; None: one global instance
    impl: str  # "module:function", called as function(cfg, entry, paths)
    help: str
    upstream: tuple[Upstream, ...] = ()
    params: tuple[str, ...] = ()  # params keys; "{entry}" is the entry name
    outs: Mapping[str, str] = field(default_factory=lambda: {"folder": ""})  # role -> path inside the folder ("": itself)
    metrics: Mapping[str, str] = field(default_factory=dict)
    plots: Mapping[str, tuple[str, dict]] = field(default_factory=dict)
    data_files: tuple[str, ...] = ()  # files other than Python modules the code reads (repo-relative)
    cache: bool = True  # DVC caches the outs (False: data folders too large to copy into .dvc/cache)
    launch: str = "single"  # "torchrun": may run on several GPUs (training; sharded evaluation and tokenization)
    root: str = "run.out"  # params key of the folder the outputs live under
    state: str = "checkpoints/{stage}/{entry}"  # rolling state (resumable work) under run.out, outside the outputs
    options: tuple[tuple[str, str], ...] = ()  # extra CLI flags: (flag, help), passed as keyword arguments

    @property
    def is_global(self) -> bool:
        return self.family is None

    def rel_outputs(self) -> dict[str, str]:
        """role -> path inside the stage's folder, for outs, metrics and plots."""
        return {**self.outs, **self.metrics, **{r: p for r, (p, _) in self.plots.items()}}


_PREP = {"via": _tok_dataset, "via_key": "train_tokenizer.{entry}.dataset"}
_TOKENS = {"via": _gen_tokens, "via_key": "train_generator.{entry}.tokens"}
_DETECTOR = Upstream("detector", "fetch_detector", (I3D_FILENAME,))
_LPIPS = Upstream("lpips", "fetch_lpips")  # its folder: the weights when something selected needs LPIPS, else a manifest
_HISTORY = "history.csv"
RUN_OUT = "{run.out}/"  # an output path starting with this lives under run.out, not in the stage's folder
TABLE_FILES = ("tokenizer.md", "tokenizer.csv", "main.md", "main.csv", "ntp_vs_nbp.md", "ntp_vs_nbp.csv", "block_size.md",
               "block_size.csv", "block_size_plot.csv", "block_size.png", "block_shape.md", "block_shape.csv", "README.md",
               "samples")

STAGES: tuple[Stage, ...] = (
    Stage("download", "datasets", "nbp.data.download:run_download",
          "fetch (or, for the embedded set, generate) a dataset in its source layout",
          params=("download.{entry}",), cache=False, state="archives/{entry}",
          options=(("--dry-run", "list what would be fetched (or generated) and where it would go; fetch nothing"),)),
    Stage("fetch_detector", None, "nbp.metrics.detector:run_fetch_detector", "fetch and verify the I3D weights for FVD",
          params=("fetch_detector",), outs={"weights": I3D_FILENAME}),
    Stage("fetch_lpips", None, "nbp.metrics.lpips_weights:run_fetch_lpips",
          "fetch and verify the LPIPS weights (VGG16, v0.1 heads) when a selected entry needs them",
          params=("fetch_lpips", "run.tokenizers"), outs={"folder": ""}, cache=False),
    Stage("prepare", "datasets", "nbp.data.prepare:run_prepare", "decode and resize clips once into a uint8 clip cache",
          (Upstream("source", "download"),), ("prepare.{entry}",), cache=False),
    Stage("real_stats", "datasets", "nbp.metrics.real_stats:run_real_stats",
          "I3D feature statistics of real clips (FVD reference)",
          (Upstream("clips", "prepare"), _DETECTOR), ("real_stats.{entry}",), launch="torchrun"),
    Stage("train_tokenizer", "tokenizers", "nbp.tokenizer.train:run_train_tokenizer", "train (or import) a video tokenizer",
          (Upstream("clips", "prepare", **_PREP), _DETECTOR, _LPIPS), ("train_tokenizer.{entry}",),
          outs={"tokenizer": "tokenizer.pt"}, metrics={"metrics": "metrics.json"},
          plots={"history": (_HISTORY, {"x": "step", "y": "loss"})}, launch="torchrun"),
    Stage("eval_tokenizer", "tokenizers", "nbp.tokenizer.evaluate:run_eval_tokenizer",
          "rFVD, PSNR, SSIM, LPIPS, codebook usage of a tokenizer",
          (Upstream("tokenizer", "train_tokenizer", ("tokenizer.pt",)), Upstream("clips", "prepare", **_PREP), _DETECTOR,
           _LPIPS), ("eval_tokenizer.{entry}",), outs={"video": "recon.mp4", "grid": "recon.gif"},
          metrics={"metrics": "metrics.json"}, launch="torchrun"),
    Stage("tokenize", "tokenizers", "nbp.tokenizer.tokenize:run_tokenize", "encode the clip cache into token shards once",
          (Upstream("tokenizer", "train_tokenizer", ("tokenizer.pt",)), Upstream("clips", "prepare", **_PREP)),
          ("tokenize.{entry}",), cache=False, launch="torchrun"),
    Stage("train_generator", "generators", "nbp.generator.train:run_train_generator", "train (or import) an NBP/NTP generator",
          (Upstream("tokens", "tokenize", **_TOKENS),), ("train_generator.{entry}",), outs={"generator": "generator.pt"},
          metrics={"metrics": "metrics.json"}, plots={"history": (_HISTORY, {"x": "step", "y": "val_loss"})},
          data_files=("nbp/generator/ucf101_llama_text_ids.tsv", "workflow/deepspeed/zero2.json",
                      "workflow/deepspeed/zero3.json"), launch="torchrun"),
    Stage("eval_generator", "generators", "nbp.generator.evaluate:run_eval_generator",
          "sample videos; gFVD, steps, frames per second",
          (Upstream("generator", "train_generator", ("generator.pt",)), Upstream("tokens", "tokenize", **_TOKENS),
           Upstream("tokenizer", "train_tokenizer", ("tokenizer.pt",), via=gen_tokenizer, via_key="tokenize.<tokens>.tokenizer"),
           Upstream("real_stats", "real_stats", via=_gen_real_stats, via_key="eval_generator.{entry}.real_stats"),
           Upstream("clips", "prepare", via=_gen_real_clips, via_key="real_stats.<real_stats>.dataset"), _DETECTOR),
          ("eval_generator.{entry}",), outs={"video": "samples.mp4", "grid": "samples.gif"}, metrics={"metrics": "metrics.json"},
          data_files=("nbp/generator/ucf101_llama_text_ids.tsv",), launch="torchrun"),
    Stage("tables", None, "nbp.tables:run_tables", "gather metrics into the paper's tables in results/",
          (Upstream("eval_tokenizer", "eval_tokenizer", ("metrics.json", "recon.gif"), fan_in=True),
           Upstream("eval_generator", "eval_generator", ("metrics.json", "samples.gif"), fan_in=True)),
          ("tables", "download", "prepare", "train_tokenizer", "eval_tokenizer", "tokenize", "train_generator",
           "eval_generator"),
          outs={f: f for f in TABLE_FILES} | {"receipt": RUN_OUT + "tables/receipt.json"}, cache=False, root="tables.out"),
)
BY_NAME = {s.name: s for s in STAGES}
DIR_OUTPUTS = {("tables", "samples")}  # folder outputs besides a stage's own folder ("")

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


def out_path(base: str, rel: str, run_out: str) -> str:
    """An output's path: inside the stage folder ``base``, or under ``run_out`` for ``{run.out}/...`` paths."""
    return f"{run_out}/{rel[len(RUN_OUT):]}" if rel.startswith(RUN_OUT) else _join(base, rel)


def outputs(cfg: Config, stage: str, entry: str | None) -> dict[str, list[str]]:
    """``{"outs": [...], "metrics": [...], "plots": [...]}`` of one stage instance."""
    s, base = BY_NAME[stage], folder(cfg, stage, entry)
    out = cfg.run.out
    return {"outs": [out_path(base, o, out) for o in s.outs.values()],
            "metrics": [out_path(base, m, out) for m in s.metrics.values()],
            "plots": [out_path(base, p, out) for p, _ in s.plots.values()]}


def all_outputs(cfg: Config, stage: str, entry: str | None) -> list[str]:
    o = outputs(cfg, stage, entry)
    return o["outs"] + o["metrics"] + o["plots"]


def is_dir_output(stage: str, rel: str) -> bool:
    return rel == "" or (stage, rel) in DIR_OUTPUTS


def _upstream_entries(cfg: Config, up: Upstream, entry: str | None) -> list[str | None]:
    if BY_NAME[up.stage].is_global:
        return [None]
    if up.fan_in:
        return selected(cfg, up.stage)
    return [up.via(cfg, entry)] if up.via is not None else [entry]


def _upstream_paths(cfg: Config, up: Upstream, name: str | None) -> list[str]:
    base = folder(cfg, up.stage, name)
    return [_join(base, f) for f in up.files] if up.files else [base]


def input_files(cfg: Config, stage: str, entry: str | None) -> dict[str, list[str]]:
    """role -> the upstream files or folders one stage instance reads, exact entries."""
    return {up.role: [p for n in _upstream_entries(cfg, up, entry) for p in _upstream_paths(cfg, up, n)]
            for up in BY_NAME[stage].upstream}


def inputs(cfg: Config, stage: str, entry: str | None, root: Path = ROOT) -> list[str]:
    """Every file or folder one stage instance reads (code files, then upstream outputs), exact entries."""
    return list(code_deps(stage, root)) + [p for files in input_files(cfg, stage, entry).values() for p in files]


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
# the resolved paths a stage is handed


@dataclass(frozen=True)
class StagePaths:
    """The paths of one stage instance, as the DAG (and so DVC and Snakemake) sees them.

    ``inputs``: role -> the upstream file (one file), folder (a folder output or several files) or, for a fan-in,
    ``{entry: folder}``. ``outputs``: role -> path. ``folder``: the stage's output folder (written atomically);
    ``state``: its rolling state outside the declared outputs (training checkpoints, download archives);
    ``logs``: where logs that must survive a failed run go.
    """

    stage: str
    entry: str | None
    folder: Path
    outputs: dict[str, Path]
    inputs: dict[str, Any]
    state: Path
    logs: Path
    producers: dict[str, tuple[str, str | None]]  # input role -> (upstream stage, entry)

    def need(self, role: str) -> Path:
        """The input of ``role``, or one line saying which upstream stage to run when it is missing."""
        path = self.inputs[role]
        if not Path(path).exists():
            up, name = self.producers[role]
            me = self.stage if self.entry is None else f"{self.stage} {self.entry}"
            raise NbpError(f"{path}: input `{role}` of `nbp {me}` is missing (run `nbp {up}"
                           f"{'' if name is None else ' ' + name}` first)")
        return Path(path)

    def name(self, role: str) -> str:
        """An output's path inside the stage's folder (for writing into the atomic temporary folder)."""
        return str(self.outputs[role].relative_to(self.folder))


def resolve(cfg: Config, stage: str, entry: str | None) -> StagePaths:
    s = BY_NAME[stage]
    base = folder(cfg, stage, entry)
    ins: dict[str, Any] = {}
    producers: dict[str, tuple[str, str | None]] = {}
    for up in s.upstream:
        names = _upstream_entries(cfg, up, entry)
        if up.fan_in:
            ins[up.role] = {n: Path(folder(cfg, up.stage, n)) for n in names}
        else:
            paths = _upstream_paths(cfg, up, names[0])
            ins[up.role] = Path(paths[0] if len(up.files) == 1 else folder(cfg, up.stage, names[0]))
        producers[up.role] = (up.stage, None if up.fan_in else names[0])
    key = "{stage}" if s.is_global else "{stage}/{entry}"
    sub = s.state.replace("{stage}/{entry}", key).format(stage=stage, entry=entry)
    outs = {r: Path(out_path(base, p, cfg.run.out)) for r, p in s.rel_outputs().items()}
    return StagePaths(stage, entry, Path(base), outs, ins,
                      Path(cfg.run.out) / sub, Path(cfg.run.out) / "logs" / key.format(stage=stage, entry=entry), producers)


# --------------------------------------------------------------------------------------
# code dependencies: the modules a stage's implementation imports


def _module_file(name: str, root: Path) -> Path | None:
    base = root / Path(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _imports_of(path: Path, module: str, root: Path) -> set[str]:
    """nbp modules a file imports (top level and inside functions); ``from pkg import name`` counts the
    submodule ``pkg.name`` when there is one, else ``pkg``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if _module_file(sub, root) else base)
    return {m for m in found if m == "nbp" or m.startswith("nbp.")}


@cache
def _closure(module: str, root: Path, follow_untracked: bool = False) -> tuple[str, ...]:
    """Repo-relative files of ``module`` and every nbp module it imports, transitively, with their packages
    (without the untracked modules, whose imports are not followed unless ``follow_untracked``), and the C source
    beside a module of the same name (``kernels.c`` beside ``kernels.py``: the extension that module loads)."""
    untracked = set() if follow_untracked else set(UNTRACKED_CODE)
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        parts = m.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py
            pkg = ".".join(parts[:i])
            f = _module_file(pkg, root)
            if f is None or pkg in seen:
                continue
            seen.add(pkg)
            rel = str(f.relative_to(root))
            if rel not in untracked:
                todo += sorted(_imports_of(f, pkg, root))
    files = {str(_module_file(m, root).relative_to(root)) for m in seen}
    files |= {str(Path(f).with_suffix(".c")) for f in files if (root / f).with_suffix(".c").is_file()}  # compiled parts
    return tuple(sorted(files - untracked))


def code_deps(stage: str, root: Path = ROOT) -> tuple[str, ...]:
    """The files a stage's outputs depend on as code: its modules (computed) and the data files it declares."""
    s = BY_NAME[stage]
    modules = set(_closure(s.impl.split(":")[0], root)) | set(_closure("nbp.config", root))  # every stage gets the params
    return tuple(sorted(modules)) + s.data_files


# --------------------------------------------------------------------------------------
# cluster resources and the multi-GPU launcher


# minutes / MiB / cores / GPUs for paper-scale entries; the embedded experiment and tests use SMALL. The sharded
# stages (real_stats, eval_*, tokenize) ask for 4-8 GPUs; their times are not measured at paper scale (README
# "Sharded evaluation" gives the estimate eval_generator's is based on)
SMALL = {"runtime": 30, "mem_mb": 8000, "cpus_per_task": 2, "gpu": 0}
PAPER: dict[str, dict[str, int]] = {
    "download": {"runtime": 1440, "mem_mb": 8000, "cpus_per_task": 4, "gpu": 0},
    "fetch_detector": {"runtime": 30, "mem_mb": 2000, "cpus_per_task": 1, "gpu": 0},
    "fetch_lpips": {"runtime": 60, "mem_mb": 4000, "cpus_per_task": 1, "gpu": 0},
    "prepare": {"runtime": 1440, "mem_mb": 64000, "cpus_per_task": 16, "gpu": 0},
    "real_stats": {"runtime": 360, "mem_mb": 64000, "cpus_per_task": 16, "gpu": 4},
    "train_tokenizer": {"runtime": 4320, "mem_mb": 256000, "cpus_per_task": 32, "gpu": 8},
    "eval_tokenizer": {"runtime": 360, "mem_mb": 64000, "cpus_per_task": 16, "gpu": 4},
    "tokenize": {"runtime": 180, "mem_mb": 128000, "cpus_per_task": 32, "gpu": 8},
    "train_generator": {"runtime": 4320, "mem_mb": 256000, "cpus_per_task": 32, "gpu": 8},
    "eval_generator": {"runtime": 1440, "mem_mb": 128000, "cpus_per_task": 32, "gpu": 8},
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
        ds = cfg.train_tokenizer[gen_tokenizer(cfg, entry)].dataset
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
    """How to start a stage: ``nbp`` (one process), or torchrun for a ``launch="torchrun"`` stage on several GPUs
    (training, and the sharded real_stats, eval_tokenizer, tokenize and eval_generator). torchrun runs as
    ``python -m nbp.launch`` (torchrun's arguments and agent; a failed rank ends in one line and its exit code, see
    nbp/launch.py). ``python`` is the job's environment's (the one whose ``nbp`` the one-process jobs run), not this
    process's interpreter: a Slurm job may run on a node where that path means nothing.

    ``gpu`` is the number of GPUs per node. One node: ``torchrun --standalone``. Several nodes (Slurm
    resources ``nodes`` > 1, ``mpi: srun``): one torchrun per node through ``srun``, rendezvous on the
    first node of the allocation, on a port of the job's own (two jobs may share a first node). srun is given the
    node count: Snakemake's Slurm executor strips the job's ``SLURM_*`` variables, and srun alone then starts one
    task on one node (seen on a two-node Slurm: the rendezvous waited for a second torchrun that never came).
    """
    if BY_NAME[stage].launch != "torchrun" or (gpu <= 1 and nodes <= 1):
        return "nbp"
    if nodes <= 1:
        return f"python -m nbp.launch --standalone --nproc_per_node={gpu} -m nbp"
    return (f"srun --nodes={nodes} --ntasks-per-node=1 python -m nbp.launch --nnodes={nodes} "
            f"--nproc_per_node={max(gpu, 1)} --rdzv_id=$SLURM_JOB_ID --rdzv_backend=c10d "
            "--rdzv_endpoint=$(hostname):$((29500 + SLURM_JOB_ID % 1000)) -m nbp")


# --------------------------------------------------------------------------------------
# dvc.yaml


def _dvc_folder(stage: str, item: str | None) -> str:
    s = BY_NAME[stage]
    if s.root == "tables.out":
        return "${tables.out}"
    base = f"${{run.out}}/{stage}"
    return base if s.is_global else f"{base}/{item}"


def _dvc_deps(s: Stage) -> list[str]:
    deps = list(code_deps(s.name))
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
    body: dict[str, Any] = {"desc": s.help, "cmd": command(s.name, item), "deps": _dvc_deps(s)}
    body["params"] = [k.replace("{entry}", "${item}") for k in s.params]
    outs = [out_path(base, o, "${run.out}") for o in s.outs.values()]
    body["outs"] = [{o: {"cache": False}} if not s.cache else o for o in outs]
    if s.metrics:
        body["metrics"] = [{_join(base, m): {"cache": False}} for m in s.metrics.values()]
    if s.plots:
        body["plots"] = [{_join(base, p): {"cache": False, **props}} for p, props in s.plots.values()]
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
        write_text(DVC_YAML, text)
        print(f"wrote {DVC_YAML}")
        return 0
    sys.stdout.write(text)
    return 0
