# Shared by the rules: the typed params, and the per-stage inputs / outputs / params / resources /
# launcher that nbp/dag.py describes (dvc.yaml is generated from the same description).
from pathlib import Path

from nbp import dag, validate
from nbp.config import from_dict

CFG = from_dict(dict(config), source="params.yaml (Snakemake config)")
dag.check_wiring(CFG)
validate.check_consistency(CFG)  # everything knowable before the first job: one line naming the keys
ENV = "../envs/nbp.yaml"


# downloads need the network (often only on the login node); tables is a few seconds of pandas
localrules:
    download,
    fetch_detector,
    fetch_lpips,
    tables,


def entries(stage):
    """Regex of the entry names `run` selects for a stage (the `entry` wildcard)."""
    names = dag.selected(CFG, stage)
    return "|".join(names) if names else "(?!)"


def _entry(stage):
    return None if dag.BY_NAME[stage].is_global else "{entry}"


def stage_outputs(stage):
    """role -> output path of a stage (`directory()` for folder outputs); `{entry}` stays a wildcard."""
    s = dag.BY_NAME[stage]
    base = dag.folder(CFG, stage, _entry(stage))
    out = {}
    for role, rel in s.rel_outputs().items():
        path = dag.out_path(base, rel, CFG.run.out)
        out[role] = directory(path) if dag.is_dir_output(stage, rel) else path
    return out


def stage_inputs(stage):
    """A function of the wildcards: role -> upstream output (as `nbp <stage>` receives them), and `code`: the
    modules the stage imports (files of this checkout)."""

    def inputs(wc):
        named = {"code": list(dag.code_deps(stage, Path(workflow.basedir)))}
        return named | dag.input_files(CFG, stage, wc.get("entry"))

    return inputs


def stage_log(stage):
    return f"logs/{stage}.log" if dag.BY_NAME[stage].is_global else f"logs/{stage}/{{entry}}.log"


def stage_params(stage):
    """The stage instance's params values (JSON): a change reruns it (Snakemake's params trigger)."""
    return lambda wc: dag.params_values(config, stage, wc.get("entry"))


def stage_resource(stage, key):
    return lambda wc: dag.resources(CFG, stage, wc.get("entry"))[key]


def stage_command(stage):
    """`nbp <stage> [entry]`, started by torchrun over the job's GPUs for torchrun-launchable stages (training, sharded
    evaluation and tokenization): `resources.gpu` on one node, or `resources.gpus_per_node` on each of
    `resources.nodes` nodes."""

    def command(wildcards, resources):
        gpus = resources.get("gpus_per_node") or resources.get("gpu") or 0
        launcher = dag.launcher(stage, int(gpus), int(resources.get("nodes") or 1))
        return dag.command(stage, wildcards.get("entry"), launcher)

    return command
