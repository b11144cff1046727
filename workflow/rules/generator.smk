# Generators: train (or import) NBP / NTP on the token shards -> sample and evaluate (gFVD, steps, FPS).
# Training runs under torchrun when the rule gets more than one GPU (resources.gpu, see nbp/dag.py:launcher).
# Inputs, outputs, params and resources come from nbp/dag.py (see common.smk).


rule train_generator:
    input:
        stage_inputs("train_generator"),
    output:
        stage_outputs("train_generator"),
    params:
        values=stage_params("train_generator"),
        launch=stage_launcher("train_generator"),
    log:
        "logs/train_generator/{entry}.log",
    wildcard_constraints:
        entry=entries("train_generator"),
    threads: stage_resource("train_generator", "cpus_per_task")
    resources:
        runtime=stage_resource("train_generator", "runtime"),
        mem_mb=stage_resource("train_generator", "mem_mb"),
        cpus_per_task=stage_resource("train_generator", "cpus_per_task"),
        gpu=stage_resource("train_generator", "gpu"),
    conda:
        ENV
    shell:
        "{params.launch} train_generator {wildcards.entry} > {log} 2>&1"


rule eval_generator:
    input:
        stage_inputs("eval_generator"),
    output:
        stage_outputs("eval_generator"),
    params:
        values=stage_params("eval_generator"),
        launch=stage_launcher("eval_generator"),
    log:
        "logs/eval_generator/{entry}.log",
    wildcard_constraints:
        entry=entries("eval_generator"),
    threads: stage_resource("eval_generator", "cpus_per_task")
    resources:
        runtime=stage_resource("eval_generator", "runtime"),
        mem_mb=stage_resource("eval_generator", "mem_mb"),
        cpus_per_task=stage_resource("eval_generator", "cpus_per_task"),
        gpu=stage_resource("eval_generator", "gpu"),
    conda:
        ENV
    shell:
        "{params.launch} eval_generator {wildcards.entry} > {log} 2>&1"
