# Stage 4: the paper-layout tables, the figures and the self-contained HTML comparison report.
#
# A partial grid still gets a report: when jobs fail (run with --keep-going so that every other cell
# finishes first), the `onerror` handler below aggregates the metrics.json files that exist and writes
# the same report, with the other cells marked missing (failed ones with their log's error line).


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
        agg=f"{R}/aggregate",
    shell:
        "python -m ltbench report --aggregate-dir {params.agg} --figures-dir {output.figures} "
        "--tables-dir {output.tables} --config-json {params.cfg:q} --out {output.html} > {log} 2>&1"


def partial_report(snakemake_log=None):
    """After a failed run: the report of the finished cells (the others marked missing).

    Runs the same two commands as the rules, with `aggregate --existing`. The outputs are then dated
    before the oldest finished metrics.json, so the next run regenerates them (they are not a
    complete aggregate). Never raises: the run has already failed and says why.
    """
    import os
    import subprocess

    log = f"{R}/logs/partial_report.log"
    os.makedirs(os.path.dirname(log), exist_ok=True)
    cfg = json.dumps(config)
    env = {**os.environ, "PYTHONPATH": f"{workflow.basedir}:{os.environ.get('PYTHONPATH', '')}"}
    cmds = [
        [sys.executable, "-m", "ltbench", "aggregate", "--existing", "--config-json", cfg, "--out-dir", f"{R}/aggregate"],
        [sys.executable, "-m", "ltbench", "report", "--aggregate-dir", f"{R}/aggregate", "--figures-dir",
         f"{R}/figures", "--tables-dir", f"{R}/tables", "--config-json", cfg, "--out", REPORT],
    ]
    try:
        with open(log, "w") as fh:
            for cmd in cmds:
                if subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode:
                    print(f"ltbench: could not write the partial report; see {log}", file=sys.stderr)
                    return
        done = [p for p in metrics_files() if os.path.exists(p)]
        stamp = min(os.path.getmtime(p) for p in done) - 1 if done else 0
        outputs = [*rules.aggregate.output, REPORT, f"{R}/figures", f"{R}/tables"]
        for p in outputs:
            if os.path.exists(p):
                os.utime(p, (stamp, stamp))
        print(f"ltbench: some jobs failed; partial report of the {len(done)} finished cells of {len(CELLS)}: "
              f"{REPORT} (missing cells listed there; log: {log})", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - the handler must not mask the run's own error
        print(f"ltbench: could not write the partial report: {e}", file=sys.stderr)


onerror:
    partial_report(log)
