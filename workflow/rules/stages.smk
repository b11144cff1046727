# GENERATED RULES: one rule per stage of the registry in nbp/dag.py, made in the loop below (the same registry
# generates dvc.yaml). Each rule has the stage's name; its named inputs are the upstream outputs by role (as the
# stage function receives them) plus `code` (the modules the stage imports); its named outputs are the stage's
# outputs by role; the command is `nbp <stage> <entry>` (or torchrun/srun for multi-GPU training and sharded evaluation, see
# stage_command), logging to logs/<stage>/<entry>.log. `snakemake -n -p` prints each job with these names.
# (Directives that Snakemake evaluates at run time, like `shell:`, must not name the loop variable.)


for _stage in dag.STAGES:

    rule:
        name:
            _stage.name
        input:
            unpack(stage_inputs(_stage.name)),
        output:
            **stage_outputs(_stage.name),
        params:
            values=stage_params(_stage.name),
            command=stage_command(_stage.name),
        log:
            stage_log(_stage.name),
        wildcard_constraints:
            entry=entries(_stage.name),
        threads: stage_resource(_stage.name, "cpus_per_task")
        resources:
            runtime=stage_resource(_stage.name, "runtime"),
            mem_mb=stage_resource(_stage.name, "mem_mb"),
            cpus_per_task=stage_resource(_stage.name, "cpus_per_task"),
            gpu=stage_resource(_stage.name, "gpu"),
        conda:
            ENV
        shell:
            "{params.command} > {log} 2>&1"
