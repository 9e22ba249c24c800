# Stage 2: one job per cell (dataset × ratio × method × backbone × seed).
#
# Fault tolerance: the trainer writes checkpoint.pt next to its outputs every
# train.checkpoint_every epochs and on SIGTERM/SIGUSR1 (then exits 75), and a rerun in the same
# directory resumes from it; `exec` makes the trainer the shell's own process, so a signal sent to
# the job (SLURM's --signal, scancel, a preemption) reaches it directly. Cluster resources come
# from the config (resources.train, resources.cells per dataset / backbone, resources.default).
# A cell given more than one GPU trains data-parallel on them: `torchrun --standalone
# --nproc_per_node=<gpu>` (ltbench.training.distributed) instead of `python`.


rule train:
    input:
        prepared,
    output:
        metrics=f"{R}/runs/{{dataset}}/r{{ratio}}/{{method}}/{{backbone}}/s{{seed}}/metrics.json",
        log=f"{R}/runs/{{dataset}}/r{{ratio}}/{{method}}/{{backbone}}/s{{seed}}/train.jsonl",
    log:
        f"{R}/logs/train/{{dataset}}/r{{ratio}}/{{method}}/{{backbone}}/s{{seed}}.log",
    conda:
        ENV
    threads: 1
    resources:
        gpu=train_resource("gpu", 0),
        gpu_model=train_resource("gpu_model", None),
        runtime=train_resource("runtime", 60),
        mem_mb=train_resource("mem_mb", 4000),
        cpus_per_task=train_resource("cpus_per_task", 1),
    params:
        spec=lambda w: json.dumps(ltconfig.cell_spec(config, w.dataset, w.method, w.backbone), sort_keys=True),
        out=lambda w, output: os.path.dirname(output.metrics),
        launch=lambda w, resources: launcher(resources.gpu),
    shell:
        "exec {params.launch} -m ltbench train --dataset {wildcards.dataset:q} --ratio {wildcards.ratio:q} "
        "--method {wildcards.method:q} --backbone {wildcards.backbone:q} --seed {wildcards.seed:q} "
        "--spec {params.spec:q} --data {input:q} --threads {threads} --out {params.out:q} > {log:q} 2>&1"
