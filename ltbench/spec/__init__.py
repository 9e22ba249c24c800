"""Stage 0, the specification: config loading and schema, the grid of cells, method recipes and the
catalog of part names a config may use. Imports no torch (the Snakefile builds its DAG from here)."""
