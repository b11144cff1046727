# Datasets: download (or generate) -> prepare (clip cache) -> real_stats (FVD reference); the I3D weights.
# Inputs, outputs, params and resources come from nbp/dag.py (see common.smk).


rule download:
    input:
        stage_inputs("download"),
    output:
        stage_outputs("download"),
    params:
        values=stage_params("download"),
        launch=stage_launcher("download"),
    log:
        "logs/download/{entry}.log",
    wildcard_constraints:
        entry=entries("download"),
    threads: stage_resource("download", "cpus_per_task")
    resources:
        runtime=stage_resource("download", "runtime"),
        mem_mb=stage_resource("download", "mem_mb"),
        cpus_per_task=stage_resource("download", "cpus_per_task"),
        gpu=stage_resource("download", "gpu"),
    conda:
        ENV
    shell:
        "{params.launch} download {wildcards.entry} > {log} 2>&1"


rule fetch_detector:
    input:
        stage_inputs("fetch_detector"),
    output:
        stage_outputs("fetch_detector", None),
    params:
        values=stage_params("fetch_detector"),
        launch=stage_launcher("fetch_detector"),
    log:
        "logs/fetch_detector.log",
    threads: stage_resource("fetch_detector", "cpus_per_task")
    resources:
        runtime=stage_resource("fetch_detector", "runtime"),
        mem_mb=stage_resource("fetch_detector", "mem_mb"),
        cpus_per_task=stage_resource("fetch_detector", "cpus_per_task"),
        gpu=stage_resource("fetch_detector", "gpu"),
    conda:
        ENV
    shell:
        "{params.launch} fetch_detector > {log} 2>&1"


rule prepare:
    input:
        stage_inputs("prepare"),
    output:
        stage_outputs("prepare"),
    params:
        values=stage_params("prepare"),
        launch=stage_launcher("prepare"),
    log:
        "logs/prepare/{entry}.log",
    wildcard_constraints:
        entry=entries("prepare"),
    threads: stage_resource("prepare", "cpus_per_task")
    resources:
        runtime=stage_resource("prepare", "runtime"),
        mem_mb=stage_resource("prepare", "mem_mb"),
        cpus_per_task=stage_resource("prepare", "cpus_per_task"),
        gpu=stage_resource("prepare", "gpu"),
    conda:
        ENV
    shell:
        "{params.launch} prepare {wildcards.entry} > {log} 2>&1"


rule real_stats:
    input:
        stage_inputs("real_stats"),
    output:
        stage_outputs("real_stats"),
    params:
        values=stage_params("real_stats"),
        launch=stage_launcher("real_stats"),
    log:
        "logs/real_stats/{entry}.log",
    wildcard_constraints:
        entry=entries("real_stats"),
    threads: stage_resource("real_stats", "cpus_per_task")
    resources:
        runtime=stage_resource("real_stats", "runtime"),
        mem_mb=stage_resource("real_stats", "mem_mb"),
        cpus_per_task=stage_resource("real_stats", "cpus_per_task"),
        gpu=stage_resource("real_stats", "gpu"),
    conda:
        ENV
    shell:
        "{params.launch} real_stats {wildcards.entry} > {log} 2>&1"
