# Stage 4: the paper-layout tables, the figures and the self-contained HTML comparison report.
#
# A partial grid still gets a report: when jobs fail (run with --keep-going so that every other cell
# finishes first), the `onerror` handler below (partial_report, in common.smk) aggregates the
# metrics.json files that exist and writes the same report, with the other cells marked missing
# (failed ones with their log's error line), to <reports_dir>/<name>.partial.html and
# {results_dir}/partial/: never over a rule's output, so rerunning the same command finishes the grid.
# A successful run removes that partial report.


rule report:
    input:
        rules.aggregate.output,
    output:
        html=report(REPORT, caption="../report/html.rst", category="Report", labels={"file": "comparison report"}),
        figures=report(
            directory(f"{R}/figures"),
            patterns=["{experiment}/{figure}.png"],
            caption="../report/figure.rst",
            category="Figures",
            subcategory="{experiment}",
            labels={"experiment": "{experiment}", "figure": "{figure}"},
        ),
        tables=report(
            directory(f"{R}/tables"),
            patterns=["{experiment}.html"],
            caption="../report/table.rst",
            category="Tables",
            subcategory="Paper layout",
            labels={"experiment": "{experiment}"},
        ),
    log:
        f"{R}/logs/report.log",
    conda:
        ENV
    params:
        cfg=lambda w: json.dumps(config),
        agg=lambda w, input: os.path.dirname(input[0]),
    shell:
        "python -m ltbench report --aggregate-dir {params.agg:q} --figures-dir {output.figures:q} "
        "--tables-dir {output.tables:q} --config-json {params.cfg:q} --out {output.html:q} > {log:q} 2>&1"


onsuccess:
    remove_partial_report()


onerror:
    partial_report(log)
