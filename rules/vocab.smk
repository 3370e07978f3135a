# Stage 2b: the draft vocabulary (d2t.npy, t2d.npy) from a run's combined token counts.
# The draft vocab size is in the path, so a mapping for another size is never picked up;
# vocab.json records the sha256 of the token_freq.pt it came from (train checks it).


rule vocab_mapping:
    input:
        token_freq="results/{run}/prepared/token_freq.pt",
        target=target_input,
    output:
        d2t="results/{run}/vocab/{vocab_size}/d2t.npy",
        t2d="results/{run}/vocab/{vocab_size}/t2d.npy",
        record="results/{run}/vocab/{vocab_size}/vocab.json",
    log:
        "logs/vocab/mapping/{run}/{vocab_size}.log",
    benchmark:
        "benchmarks/vocab/mapping/{run}/{vocab_size}.tsv"
    wildcard_constraints:
        vocab_size=r"\d+",
    conda:
        "../envs/main.yaml"
    resources:
        mem_mb=2000,
        runtime=attempt_runtime(10),
    params:
        target=target_of,
        outdir=subpath(output.d2t, parent=True),
    shell:
        "speculators vocab --token-freq {input.token_freq:q} --target {params.target:q}"
        " --draft-vocab-size {wildcards.vocab_size} --output-dir {params.outdir:q}"
        " > {log:q} 2>&1"
