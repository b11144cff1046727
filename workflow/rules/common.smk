# Shared by the rules: the typed params, and the per-stage inputs / outputs / params / resources /
# launcher that nbp/dag.py describes (dvc.yaml is generated from the same description).
from pathlib import Path

from nbp import dag
from nbp.config import from_dict

CFG = from_dict(dict(config), source="params.yaml (Snakemake config)")
dag.check_wiring(CFG)
ENV = "../envs/nbp.yaml"


# downloads need the network (often only on the login node); tables is a few seconds of pandas
localrules:
    download,
    fetch_detector,
    tables,


def entries(stage):
    """Regex of the entry names `run` selects for a stage (the `entry` wildcard)."""
    names = dag.selected(CFG, stage)
    return "|".join(names) if names else "(?!)"


def stage_outputs(stage, entry="{entry}"):
    """Output files of a stage; `directory()` for folder outputs. `entry` stays a wildcard by default."""
    s = dag.BY_NAME[stage]
    base = dag.folder(CFG, stage, entry if not s.is_global else None)
    out = []
    for rel in s.outs + s.metrics + tuple(p for p, _ in s.plots):
        path = f"{base}/{rel}" if rel else base
        out.append(directory(path) if dag.is_dir_output(stage, rel) else path)
    return out


def stage_inputs(stage):
    """A function of the wildcards: code files (of this checkout) and upstream outputs of one stage instance."""
    return lambda wc: dag.inputs(CFG, stage, wc.get("entry"), root=Path(workflow.basedir))


def stage_params(stage):
    """The stage instance's params values (JSON): a change reruns it (Snakemake's params trigger)."""
    return lambda wc: dag.params_values(config, stage, wc.get("entry"))


def stage_resource(stage, key):
    return lambda wc: dag.resources(CFG, stage, wc.get("entry"))[key]


def stage_launcher(stage):
    """`nbp`, or torchrun over the job's GPUs for training stages: `resources.gpu` on one node, or
    `resources.gpus_per_node` on each of `resources.nodes` nodes."""

    def launch(wildcards, resources):
        gpus = resources.get("gpus_per_node") or resources.get("gpu") or 0
        return dag.launcher(stage, int(gpus), int(resources.get("nodes") or 1))

    return launch
