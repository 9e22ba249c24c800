# Stage 4: figures and the self-contained HTML comparison report.


rule report:
    input:
        rules.aggregate.output,
    output:
        html=report(REPORT, caption="../report/html.rst", category="Report"),
        groups=report(f"{R}/figures/groups.png", caption="../report/groups.rst", category="Figures"),
        per_class=report(f"{R}/figures/per_class.png", caption="../report/per_class.rst", category="Figures"),
    log:
        f"{R}/logs/report.log",
    conda:
        ENV
    params:
        cfg=lambda w: json.dumps(config),
        agg=f"{R}/aggregate",
        figures=f"{R}/figures",
    shell:
        "python -m ltbench report --aggregate-dir {params.agg} --figures-dir {params.figures} "
        "--config-json {params.cfg:q} --out {output.html} > {log} 2>&1"
