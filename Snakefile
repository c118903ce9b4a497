# SROC benchmark: data refinement for fully unsupervised visual inspection.
# Entry point; the rules live in workflow/rules/, the configuration in config/config.yaml.


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"


rule all:
    input:
        all_targets(),


include: "workflow/rules/data.smk"
include: "workflow/rules/splits.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/refine.smk"
include: "workflow/rules/report.smk"
