# Storage hygiene (`cleanup_hidden_states: true`): once a run's draft is trained and its report
# has recorded the sizes, delete the run's hidden-state samples; cleanup.json says what was freed.


rule hidden_states_cleanup:
    input:
        data_configs=run_data_configs,
        draft="results/{run}/draft",
        report="results/{run}/report/summary.json",
    output:
        "results/{run}/hidden_states/cleanup.json",
    log:
        "logs/cleanup/hidden_states/{run}.log",
    benchmark:
        "benchmarks/cleanup/hidden_states/{run}.tsv"
    conda:
        "../envs/main.yaml"
    resources:
        mem_mb=1000,
        runtime=attempt_runtime(30),
    params:
        folders=hidden_states_dirs,
    shell:
        "speculators cleanup-hidden-states --hidden-states {params.folders:q}"
        " --output {output:q} > {log:q} 2>&1"
