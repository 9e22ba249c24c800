# ltbench: data → train → aggregate → report.
#
#   snakemake --cores all --use-conda                                  # the paper grid (config/config.yaml)
#   snakemake --cores 2 --configfile config/demo.yaml                  # the offline demo (digits-lt)
#   snakemake --profile profiles/slurm                                 # on a SLURM cluster
#
# Rules live in workflow/rules/ by stage; every rule calls `python -m ltbench <subcommand>`.

if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        REPORT,
