# The paper's tables, gathered from every evaluation's metrics.json into results/.
# Inputs, outputs, params and resources come from nbp/dag.py (see common.smk).


rule tables:
    input:
        stage_inputs("tables"),
    output:
        stage_outputs("tables", None),
    params:
        values=stage_params("tables"),
        launch=stage_launcher("tables"),
    log:
        "logs/tables.log",
    threads: stage_resource("tables", "cpus_per_task")
    resources:
        runtime=stage_resource("tables", "runtime"),
        mem_mb=stage_resource("tables", "mem_mb"),
        cpus_per_task=stage_resource("tables", "cpus_per_task"),
        gpu=stage_resource("tables", "gpu"),
    conda:
        ENV
    shell:
        "{params.launch} tables > {log} 2>&1"
