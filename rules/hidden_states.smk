# Stage 2: the target's hidden states per prepared row (data_{i}.pt), then data_config.json.
# Only data_config.json is declared: samples of a failed job survive and the rerun resumes.


rule hidden_states_capture:
    input:
        prepared="results/{run}/prepared/{dataset}/dataset",
        target=target_input,
    output:
        hidden_states_output("results/{run}/hidden_states/{dataset}/data_config.json"),
    log:
        "logs/hidden_states/capture/{run}/{dataset}.log",
    benchmark:
        "benchmarks/hidden_states/capture/{run}/{dataset}.tsv"
    conda:
        "../envs/main.yaml"
    # The forward passes use torch threads; Snakemake caps this at --cores and sets OMP_NUM_THREADS.
    threads: 4
    resources:
        mem_mb=stage_mem_mb("hidden_states", 16000),
        runtime=attempt_runtime(720),
        gpu=stage_gpus("hidden_states"),
        cpus_per_gpu=8,
    params:
        target=target_of,
        outdir=subpath(output[0], parent=True),
        layer_ids=layer_ids_flag,
        vllm_python=vllm_python_flag,
        dtype=lookup(dpath="runs/{run}/hidden_states/dtype", within=config),
        batch_tokens=lookup(dpath="runs/{run}/hidden_states/batch_tokens", within=config),
        backend=lookup(dpath="runs/{run}/hidden_states/backend", within=config),
        tp=lookup(dpath="runs/{run}/hidden_states/tensor_parallel_size", within=config),
        dp=lookup(dpath="runs/{run}/hidden_states/data_parallel_size", within=config),
        gpus=lookup(dpath="runs/{run}/hidden_states/gpus", within=config),
        probe_rows=lookup(dpath="runs/{run}/hidden_states/probe_rows", within=config),
        min_fidelity=min_fidelity_flag,
    shell:
        "speculators hidden-states --target {params.target:q} --prepared {input.prepared:q}"
        " --output {params.outdir:q} {params.layer_ids} --dtype {params.dtype}"
        " --batch-tokens {params.batch_tokens} --backend {params.backend}"
        " --gpus {params.gpus} --tensor-parallel-size {params.tp} --data-parallel-size {params.dp}"
        " --probe-rows {params.probe_rows} {params.min_fidelity}"
        " {params.vllm_python} > {log:q} 2>&1"
