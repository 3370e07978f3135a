# Stage 5: the benchmark report of each run (HTML + Markdown, also bundled by
# `snakemake --report`) and the comparison page across all runs of the config.


rule report_run:
    input:
        stats=prepared_stats,
        data_configs=run_data_configs,
        draft="results/{run}/draft",
        evals=eval_results,
    output:
        html=report(
            "results/{run}/report/report.html",
            caption="../report/run_report.rst",
            category="Benchmark reports",
            subcategory="{run}",
            labels={"run": "{run}", "format": "HTML"},
        ),
        md=report(
            "results/{run}/report/report.md",
            caption="../report/run_report.rst",
            category="Benchmark reports",
            subcategory="{run}",
            labels={"run": "{run}", "format": "Markdown"},
        ),
        summary="results/{run}/report/summary.json",
    log:
        "logs/report/run/{run}.log",
    benchmark:
        "benchmarks/report/run/{run}.tsv"
    conda:
        "../envs/main.yaml"
    resources:
        mem_mb=2000,
        runtime=attempt_runtime(10),
    params:
        run_config=run_config_json,
        hidden_states=hidden_states_dirs,
        benchmarks="benchmarks",
    shell:
        "speculators report --run-name {wildcards.run:q} --run-config {params.run_config:q}"
        " --prepared-stats {input.stats:q} --data-config {input.data_configs:q}"
        " --draft {input.draft:q} --eval {input.evals:q}"
        " --benchmarks-dir {params.benchmarks:q} --hidden-states {params.hidden_states:q}"
        " --output-html {output.html:q} --output-md {output.md:q}"
        " --output-summary {output.summary:q} > {log:q} 2>&1"


rule report_compare:
    input:
        expand("results/{run}/report/summary.json", run=RUNS),
    output:
        report(
            "results/comparison.html",
            caption="../report/comparison.rst",
            category="Benchmark reports",
            labels={"run": "all runs", "format": "HTML"},
        ),
    log:
        "logs/report/compare/all.log",
    benchmark:
        "benchmarks/report/compare/all.tsv"
    localrule: True
    conda:
        "../envs/main.yaml"
    resources:
        mem_mb=1000,
        runtime=attempt_runtime(5),
    shell:
        "speculators compare --summary {input:q} --output {output:q} > {log:q} 2>&1"
