# Stage 4: measure the trained draft on its benchmarks (held-out prompts, MT-Bench, HumanEval,
# own files): acceptance length and speed-up per benchmark, K and temperature.
# evaluate_inprocess decodes with transformers (CPU or GPU); the vLLM evaluator sits beside it.


rule evaluate_inprocess:
    input:
        draft="results/{run}/draft",
        prompts=eval_prompt_files,
        target=target_input,
    output:
        "results/{run}/eval/inprocess.json",
    log:
        "logs/evaluate/inprocess/{run}.log",
    benchmark:
        "benchmarks/evaluate/inprocess/{run}.tsv"
    conda:
        "../envs/main.yaml"
    threads: 2
    resources:
        mem_mb=stage_mem_mb("evaluate", 8000),
        runtime=attempt_runtime(240),
        gpu=stage_gpus("evaluate"),
        cpus_per_gpu=8,
    params:
        target=target_of,
        k=eval_ks,
        device=eval_device,
        benchmarks=eval_benchmarks_json,
        temperatures=eval_temperatures,
        seed=lookup(dpath="runs/{run}/evaluate/seed", within=config),
    shell:
        "speculators evaluate --target {params.target:q} --draft {input.draft:q}"
        " --benchmarks {params.benchmarks:q} --k {params.k} --seed {params.seed}"
        " --temperature {params.temperatures} --device {params.device} --gpus {resources.gpu}"
        " --output {output:q} > {log:q} 2>&1"


rule evaluate_vllm:
    # Runs in the main environment and hands itself to the vLLM interpreter; without one it
    # writes a skipped result (evaluate.vllm: auto) or fails (on).
    input:
        draft="results/{run}/draft",
        prompts=eval_prompt_files,
        target=target_input,
    output:
        "results/{run}/eval/vllm.json",
    log:
        "logs/evaluate/vllm/{run}.log",
    benchmark:
        "benchmarks/evaluate/vllm/{run}.tsv"
    conda:
        "../envs/vllm.yaml"
    resources:
        mem_mb=stage_mem_mb("evaluate", 16000),
        runtime=attempt_runtime(240),
        gpu=stage_gpus("evaluate"),
        cpus_per_gpu=8,
    params:
        target=target_of,
        k=eval_ks,
        vllm_python=vllm_python_flag,
        mode=lookup(dpath="runs/{run}/evaluate/vllm", within=config),
        benchmarks=eval_benchmarks_json,
        temperatures=eval_temperatures,
        seed=lookup(dpath="runs/{run}/evaluate/seed", within=config),
    shell:
        "speculators evaluate-vllm --target {params.target:q} --draft {input.draft:q}"
        " --benchmarks {params.benchmarks:q} --k {params.k} --seed {params.seed}"
        " --temperature {params.temperatures}"
        " --vllm-mode {params.mode} {params.vllm_python} --output {output:q} > {log:q} 2>&1"
