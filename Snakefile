# Trains EAGLE-3 draft models for target LLMs and reports how well they work.
# Stages (one file each under rules/): assets -> prepare -> hidden_states -> vocab -> train
# -> evaluate -> report. Every rule calls one `speculators <stage>` subcommand.
from snakemake.utils import min_version

min_version("9.12")


configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/assets.smk"
include: "rules/prepare.smk"
include: "rules/hidden_states.smk"
include: "rules/vocab.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"
include: "rules/cleanup.smk"


localrules:
    all,


rule all:
    default_target: True
    input:
        final_outputs(),
