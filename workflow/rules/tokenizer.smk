# Tokenizers: train (or import released weights) -> evaluate (rFVD, PSNR, SSIM) and tokenize the clip cache.
# Inputs, outputs, params and resources come from nbp/dag.py (see common.smk).


rule train_tokenizer:
    input:
        stage_inputs("train_tokenizer"),
    output:
        stage_outputs("train_tokenizer"),
    params:
        values=stage_params("train_tokenizer"),
        launch=stage_launcher("train_tokenizer"),
    log:
        "logs/train_tokenizer/{entry}.log",
    wildcard_constraints:
        entry=entries("train_tokenizer"),
    threads: stage_resource("train_tokenizer", "cpus_per_task")
    resources:
        runtime=stage_resource("train_tokenizer", "runtime"),
        mem_mb=stage_resource("train_tokenizer", "mem_mb"),
        cpus_per_task=stage_resource("train_tokenizer", "cpus_per_task"),
        gpu=stage_resource("train_tokenizer", "gpu"),
    conda:
        ENV
    shell:
        "{params.launch} train_tokenizer {wildcards.entry} > {log} 2>&1"


rule eval_tokenizer:
    input:
        stage_inputs("eval_tokenizer"),
    output:
        stage_outputs("eval_tokenizer"),
    params:
        values=stage_params("eval_tokenizer"),
        launch=stage_launcher("eval_tokenizer"),
    log:
        "logs/eval_tokenizer/{entry}.log",
    wildcard_constraints:
        entry=entries("eval_tokenizer"),
    threads: stage_resource("eval_tokenizer", "cpus_per_task")
    resources:
        runtime=stage_resource("eval_tokenizer", "runtime"),
        mem_mb=stage_resource("eval_tokenizer", "mem_mb"),
        cpus_per_task=stage_resource("eval_tokenizer", "cpus_per_task"),
        gpu=stage_resource("eval_tokenizer", "gpu"),
    conda:
        ENV
    shell:
        "{params.launch} eval_tokenizer {wildcards.entry} > {log} 2>&1"


rule tokenize:
    input:
        stage_inputs("tokenize"),
    output:
        stage_outputs("tokenize"),
    params:
        values=stage_params("tokenize"),
        launch=stage_launcher("tokenize"),
    log:
        "logs/tokenize/{entry}.log",
    wildcard_constraints:
        entry=entries("tokenize"),
    threads: stage_resource("tokenize", "cpus_per_task")
    resources:
        runtime=stage_resource("tokenize", "runtime"),
        mem_mb=stage_resource("tokenize", "mem_mb"),
        cpus_per_task=stage_resource("tokenize", "cpus_per_task"),
        gpu=stage_resource("tokenize", "gpu"),
    conda:
        ENV
    shell:
        "{params.launch} tokenize {wildcards.entry} > {log} 2>&1"
