# Stage 3: every metrics.json → tidy tables (pandas).


rule aggregate:
    input:
        metrics_files(),
    output:
        runs=f"{R}/aggregate/runs.csv",
        per_class=f"{R}/aggregate/per_class.csv",
        summary=report(
            f"{R}/aggregate/summary.csv",
            caption="../report/summary.rst",
            category="Tables",
        ),
    log:
        f"{R}/logs/aggregate.log",
    conda:
        ENV
    params:
        out_dir=f"{R}/aggregate",
    shell:
        "python -m ltbench aggregate {input:q} --out-dir {params.out_dir} > {log} 2>&1"
