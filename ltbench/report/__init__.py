"""Stage 4, the report: paper-layout tables, figures and the self-contained HTML page, rendered from
the files the analysis stage wrote."""
