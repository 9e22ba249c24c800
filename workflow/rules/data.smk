# Stage 1: download the originals (CIFAR), then write each long-tailed subset as .npz; image-list
# datasets (ImageNet-LT, Places-LT, iNat 2018) get their lists checked instead (prepare_lists).


rule download:
    output:
        f"{DATA}/{{dataset}}.downloaded",
    log:
        f"{R}/logs/download/{{dataset}}.log",
    conda:
        ENV
    resources:
        runtime=60,
    params:
        cfg=data_config,
        data_dir=lambda w, output: os.path.dirname(output[0]),
    shell:
        "python -m ltbench download --dataset {wildcards.dataset:q} --data-dir {params.data_dir:q} "
        "--config-json {params.cfg:q} --done {output:q} > {log:q} 2>&1"


rule prepare:
    input:
        download_marker,
    output:
        ltdata.PREPARED_PATTERN.format(results_dir=R, dataset="{dataset}", ratio="{ratio}", subset="{subset}"),
    log:
        f"{R}/logs/prepare/{{dataset}}_r{{ratio}}_s{{subset}}.log",
    conda:
        ENV
    resources:
        mem_mb=4000,
    params:
        cfg=data_config,
        data_dir=DATA,
    shell:
        "python -m ltbench prepare --dataset {wildcards.dataset:q} --ratio {wildcards.ratio:q} "
        "--subset-seed {wildcards.subset:q} --data-dir {params.data_dir:q} --config-json {params.cfg:q} "
        "--out {output:q} > {log:q} 2>&1"


# Image-list datasets (ImageNet-LT, Places-LT, iNaturalist 2018): the user's images and lists are
# checked (line counts, classes, label range, ratio, missing files) and a small manifest is written;
# the lists are not inputs, so the DAG builds without them and the check fails this job, before
# any training, with the problems listed (also shown on the console).
rule prepare_lists:
    output:
        f"{R}/data/{{dataset}}_r{{ratio}}.lists.json",
    log:
        f"{R}/logs/prepare/{{dataset}}_r{{ratio}}.log",
    conda:
        ENV
    resources:
        mem_mb=4000,
    params:
        cfg=data_config,
    shell:
        "python -m ltbench prepare --dataset {wildcards.dataset:q} --ratio {wildcards.ratio:q} "
        "--config-json {params.cfg:q} --out {output:q} > {log:q} 2>&1 || (cat {log:q} >&2; exit 1)"
