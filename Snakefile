"""The nbp DAG for Snakemake: the same stages, commands, inputs and outputs as dvc.yaml, both described once
in nbp/dag.py (one rule per stage, made in a loop in workflow/rules/stages.smk). `snakemake -c2` runs what the `run` section of params.yaml selects (the embedded experiment
by default); `--profile workflow/profiles/slurm` submits the stages to a Slurm cluster."""

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "params.yaml"


validate(config, "workflow/schemas/params.schema.json")


include: "workflow/rules/common.smk"
include: "workflow/rules/stages.smk"


rule all:
    default_target: True
    input:
        dag.all_outputs(CFG, "tables", None),
