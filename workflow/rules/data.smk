# Stage 1: download the originals (CIFAR), then write each long-tailed subset as .npz.


def download_marker(w):
    spec = ltdata.get(w.dataset)
    return f"{DATA}/{w.dataset}.downloaded" if spec.needs_download else []


rule download:
    output:
        f"{DATA}/{{dataset}}.downloaded",
    log:
        f"{R}/logs/download/{{dataset}}.log",
    conda:
        ENV
    params:
        cfg=lambda w: json.dumps(config),
    resources:
        runtime=60,
    shell:
        "python -m ltbench download --dataset {wildcards.dataset} --data-dir {DATA} "
        "--config-json {params.cfg:q} --done {output} > {log} 2>&1"


rule prepare:
    input:
        download_marker,
    output:
        f"{R}/data/{{dataset}}_r{{ratio}}_s{{subset}}.npz",
    log:
        f"{R}/logs/prepare/{{dataset}}_r{{ratio}}_s{{subset}}.log",
    conda:
        ENV
    params:
        cfg=lambda w: json.dumps(config),
    resources:
        mem_mb=4000,
    shell:
        "python -m ltbench prepare --dataset {wildcards.dataset} --ratio {wildcards.ratio} "
        "--subset-seed {wildcards.subset} --data-dir {DATA} --config-json {params.cfg:q} "
        "--out {output} > {log} 2>&1"
