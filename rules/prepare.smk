# Stage 1a: regenerate answers with the target (optional), tokenise with its chat template and
# assistant-only loss masks, count supervised tokens per dataset and per run.


rule prepare_regenerate:
    input:
        source=source_input,
        target=target_input,
    output:
        jsonl="results/{run}/regenerated/{dataset}.jsonl",
        meta="results/{run}/regenerated/{dataset}.meta.json",
    log:
        "logs/prepare/regenerate/{run}/{dataset}.log",
    benchmark:
        "benchmarks/prepare/regenerate/{run}/{dataset}.tsv"
    conda:
        "../envs/main.yaml"
    # CPU generation uses torch threads (Snakemake caps this at --cores and sets OMP_NUM_THREADS)
    threads: 4
    resources:
        mem_mb=stage_mem_mb("regenerate", 8000),
        runtime=attempt_runtime(480),
        gpu=stage_gpus("regenerate"),
        cpus_per_gpu=8,
    params:
        target=target_of,
        source=source_of,
        split=split_flag,
        local_copy=local_copy_flags,
        max_samples=max_samples_flag,
        max_turns=max_turns_flag,
        vllm_python=vllm_python_flag,
        seed=lookup(dpath="runs/{run}/prepare/seed", within=config),
        eval_prompts=lookup(dpath="runs/{run}/prepare/eval_prompts", within=config),
        backend=lookup(dpath="runs/{run}/regenerate/backend", within=config),
        max_new_tokens=lookup(dpath="runs/{run}/regenerate/max_new_tokens", within=config),
        temperature=lookup(dpath="runs/{run}/regenerate/temperature", within=config),
        top_p=lookup(dpath="runs/{run}/regenerate/top_p", within=config),
        batch_size=lookup(dpath="runs/{run}/regenerate/batch_size", within=config),
    shell:
        "speculators regenerate --target {params.target:q} --source {params.source:q}"
        " {params.split} {params.local_copy} --dataset-name {wildcards.dataset:q}"
        " --seed {params.seed}"
        " {params.max_samples} --eval-prompts {params.eval_prompts}"
        " --backend {params.backend} --max-new-tokens {params.max_new_tokens}"
        " --temperature {params.temperature} --top-p {params.top_p}"
        " --batch-size {params.batch_size} {params.max_turns} --gpus {resources.gpu}"
        " {params.vllm_python} --output {output.jsonl:q} > {log:q} 2>&1"


rule prepare_dataset:
    input:
        source=prepare_input,
        target=target_input,
    output:
        dataset=directory("results/{run}/prepared/{dataset}/dataset"),
        token_freq="results/{run}/prepared/{dataset}/token_freq.pt",
        stats="results/{run}/prepared/{dataset}/stats.json",
        eval_prompts="results/{run}/prepared/{dataset}/eval_prompts.jsonl",
    log:
        "logs/prepare/dataset/{run}/{dataset}.log",
    benchmark:
        "benchmarks/prepare/dataset/{run}/{dataset}.tsv"
    conda:
        "../envs/main.yaml"
    threads: lookup(dpath="runs/{run}/prepare/num_proc", within=config)
    resources:
        mem_mb=8000,
        runtime=attempt_runtime(120),
    params:
        target=target_of,
        source=prepare_source,
        split=split_flag,
        local_copy=local_copy_flags,
        max_samples=max_samples_flag,
        outdir=subpath(output.stats, parent=True),
        seq_length=lookup(dpath="runs/{run}/prepare/seq_length", within=config),
        seed=lookup(dpath="runs/{run}/prepare/seed", within=config),
        min_supervised_tokens=lookup(
            dpath="runs/{run}/prepare/min_supervised_tokens", within=config
        ),
        eval_prompts=lookup(dpath="runs/{run}/prepare/eval_prompts", within=config),
    shell:
        "speculators prepare --target {params.target:q} --source {params.source:q}"
        " {params.split} {params.local_copy} --dataset-name {wildcards.dataset:q}"
        " --seq-length {params.seq_length}"
        " --seed {params.seed} {params.max_samples}"
        " --min-supervised-tokens {params.min_supervised_tokens}"
        " --eval-prompts {params.eval_prompts} --num-proc {threads}"
        " --output {params.outdir:q} > {log:q} 2>&1"


rule prepare_combine_freq:
    input:
        prepared_token_freqs,
    output:
        "results/{run}/prepared/token_freq.pt",
    log:
        "logs/prepare/combine_freq/{run}.log",
    benchmark:
        "benchmarks/prepare/combine_freq/{run}.tsv"
    conda:
        "../envs/main.yaml"
    resources:
        mem_mb=2000,
        runtime=attempt_runtime(10),
    shell:
        "speculators combine-freq {input:q} --output {output:q} > {log:q} 2>&1"
