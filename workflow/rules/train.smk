# Stage 2: one job per cell (dataset × ratio × method × backbone × seed).


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
    params:
        spec=lambda w: json.dumps(ltconfig.cell_spec(config, w.dataset, w.method, w.backbone), sort_keys=True),
        out=lambda w, output: os.path.dirname(output.metrics),
    threads: 1
    resources:
        gpu=lambda w: resource("train", "gpu", 0),
        runtime=lambda w: resource("train", "runtime", 60),
        mem_mb=lambda w: resource("train", "mem_mb", 4000),
    shell:
        "python -m ltbench train --dataset {wildcards.dataset} --ratio {wildcards.ratio} "
        "--method {wildcards.method:q} --backbone {wildcards.backbone} --seed {wildcards.seed} "
        "--spec {params.spec:q} --data {input} --threads {threads} --out {params.out} > {log} 2>&1"
