# Stage 3: every metrics.json → tidy tables (pandas), per-cell statistics over seeds, verdicts against the
# papers and claimed-gain t-tests (ltbench.analysis.aggregate, ltbench.analysis.compare).


rule aggregate:
    input:
        metrics=metrics_files(),
        grid=grid_file(),
    output:
        runs=report(
            f"{R}/aggregate/runs.csv",
            caption="../report/runs.rst",
            category="Tables",
            subcategory="Aggregated results",
            labels={"table": "runs"},
        ),
        per_class=f"{R}/aggregate/per_class.csv",
        summary=report(
            f"{R}/aggregate/summary.csv",
            caption="../report/summary.rst",
            category="Tables",
            subcategory="Aggregated results",
            labels={"table": "summary"},
        ),
        cells=report(
            f"{R}/aggregate/cells.csv",
            caption="../report/cells.rst",
            category="Tables",
            subcategory="Aggregated results",
            labels={"table": "cells"},
        ),
        diagnostics=f"{R}/aggregate/diagnostics.csv",
        comparison=report(
            f"{R}/aggregate/comparison.csv",
            caption="../report/comparison.rst",
            category="Tables",
            subcategory="Aggregated results",
            labels={"table": "comparison"},
        ),
        gains=report(
            f"{R}/aggregate/gains.csv",
            caption="../report/gains.rst",
            category="Tables",
            subcategory="Aggregated results",
            labels={"table": "gains"},
        ),
        sequential=f"{R}/aggregate/sequential.csv",
        findings=report(
            f"{R}/aggregate/findings.csv",
            caption="../report/findings.rst",
            category="Tables",
            subcategory="Aggregated results",
            labels={"table": "findings"},
        ),
    log:
        f"{R}/logs/aggregate.log",
    conda:
        ENV
    params:
        out_dir=lambda w, output: os.path.dirname(output.runs),
        cfg=lambda w: json.dumps(config),
    shell:
        "python -m ltbench aggregate {input.metrics:q} --out-dir {params.out_dir:q} --config-json {params.cfg:q} > {log:q} 2>&1"
