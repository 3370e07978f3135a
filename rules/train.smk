# Stage 3: train the run's EAGLE-3 draft on its hidden states (offline: the captured folders;
# online: the prepared datasets, the target runs inside the job); results/<run>/draft/ is written
# last. Checkpoints go to the undeclared results/<run>/train_work/ (Snakemake deletes the
# declared outputs of a failed job), so rerunning a killed job resumes where it stopped.


rule train_draft:
    input:
        data_configs=run_data_configs,
        prepared=train_prepared_inputs,
        d2t=run_d2t,
        t2d=run_t2d,
        token_freq=run_token_freq,
        target=target_input,
    output:
        directory("results/{run}/draft"),
    log:
        "logs/train/draft/{run}.log",
    benchmark:
        "benchmarks/train/draft/{run}.tsv"
    conda:
        "../envs/main.yaml"
    threads: 4
    resources:
        mem_mb=stage_mem_mb("train", 16000),
        runtime=attempt_runtime(1440),
        gpu=stage_gpus("train"),
        cpus_per_gpu=8,
    params:
        target=target_of,
        data=train_data_dirs,
        hidden_states=train_hidden_states_flags,
        work_dir="results/{run}/train_work",
        num_layers=lookup(dpath="runs/{run}/train/num_layers", within=config),
        ttt_steps=lookup(dpath="runs/{run}/train/ttt_steps", within=config),
        decay=lookup(dpath="runs/{run}/train/ttt_step_loss_decay", within=config),
        epochs=lookup(dpath="runs/{run}/train/epochs", within=config),
        lr=lookup(dpath="runs/{run}/train/lr", within=config),
        weight_decay=lookup(dpath="runs/{run}/train/weight_decay", within=config),
        scheduler=lookup(dpath="runs/{run}/train/scheduler", within=config),
        warmup=lookup(dpath="runs/{run}/train/warmup_fraction", within=config),
        grad_clip=lookup(dpath="runs/{run}/train/grad_clip", within=config),
        total_seq_len=lookup(dpath="runs/{run}/train/total_seq_len", within=config),
        noise=lookup(dpath="runs/{run}/train/noise", within=config),
        val_fraction=lookup(dpath="runs/{run}/train/val_fraction", within=config),
        checkpoint_every=lookup(dpath="runs/{run}/train/checkpoint_every", within=config),
        seed=lookup(dpath="runs/{run}/train/seed", within=config),
        select_best_by=lookup(dpath="runs/{run}/train/select_best_by", within=config),
        precision=lookup(dpath="runs/{run}/train/precision", within=config),
        model_flags=train_model_flags,
        loggers=train_loggers,
        nproc=train_nproc_per_node,
        nnodes=lookup(dpath="runs/{run}/train/nodes", within=config),
    shell:
        "speculators train --target {params.target:q} --data {params.data}"
        " --d2t {input.d2t:q} --t2d {input.t2d:q} --token-freq {input.token_freq:q}"
        " --output {output:q} {params.hidden_states}"
        " --work-dir {params.work_dir:q} --num-layers {params.num_layers}"
        " --ttt-steps {params.ttt_steps} --ttt-step-loss-decay {params.decay}"
        " --epochs {params.epochs} --lr {params.lr} --weight-decay {params.weight_decay}"
        " --scheduler {params.scheduler} --warmup-fraction {params.warmup}"
        " --grad-clip {params.grad_clip} --total-seq-len {params.total_seq_len}"
        " --noise {params.noise} --val-fraction {params.val_fraction}"
        " --checkpoint-every {params.checkpoint_every} --seed {params.seed}"
        " --select-best-by {params.select_best_by}"
        " --precision {params.precision}"
        " {params.model_flags} --loggers {params.loggers}"
        " --nproc-per-node {params.nproc} --nnodes {params.nnodes} --gpus {resources.gpu}"
        " > {log:q} 2>&1"
