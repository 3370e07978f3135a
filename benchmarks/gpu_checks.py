"""The project's GPU-only checks in one command, for a borrowed GPU machine (see docs/benchmarks.md).

    python benchmarks/gpu_checks.py --out "$OUT"            # everything, within --budget seconds
    python benchmarks/gpu_checks.py --out /tmp/x --device cpu --only attention train

Needs only torch, transformers, safetensors and numpy: the repository root and tests/ are put on
sys.path (no install), and a missing `tqdm` (imported by the trainer) is replaced by a stub.
Checks, each in its own process with its own time limit; a failing check is recorded with its
traceback and the next one runs; the exit status is 1 when any check failed:

  env        versions, GPU name and capability, which optional packages exist, module imports
  attention  flex attention (compiled on CUDA) vs dense SDPA on a tiny 2-layer draft: packed
             documents with padding, TTT steps K=1..4; outputs, loss, stats and gradients; bf16
             autocast vs fp32 dense with a looser tolerance. CPU: eager flex forward only.
  train      `trainer.train` under torchrun (1 process; NCCL on CUDA, gloo on CPU), bf16 autocast
             on CUDA, tiny random dataset: a full run, a run crashed mid-epoch and resumed (its
             metrics must equal the full run's), then the same with FSDP2 forced on the single
             rank (`parallelize` shards only when world_size > 1, so one GPU never shards)
  bench-*    benchmarks/train_step.py runs (llama8b step / loss / naive loss, cpu-small step,
             2-layer llama8b step), each in its own process; their JSON lines are recorded
  flex-recompile-k5  ttt_steps 5 as the trainer runs it (K training + K no-grad validation
             shapes) exceed dynamo's default recompile_limit (8): does flex stay compiled?

Checks run in the order above (2-layer step last) while the budget lasts; CUDA-only ones are
"skipped: no CUDA" on CPU, where the rest shrink: eager flex forward only, gloo, cpu-small step.

Results go to OUT/gpu_checks.json (rewritten after every check) and OUT/gpu_checks.log.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
for _p in (str(TESTS), str(REPO)):  # repo first: `speculators` from this checkout, no install
    if _p not in sys.path:
        sys.path.insert(0, _p)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PIDDIR_ENV = "GPU_CHECKS_PIDDIR"  # each worker process registers its pid here (for cleanup)
STUBBED: list[str] = []  # modules replaced by stubs in this process

# check name -> (time limit on CUDA, time limit on CPU, least time worth starting it with)
LIMITS = {
    "env": (90, 180, 20),
    "attention": (150, 300, 40),
    "train": (170, 420, 60),
    "bench-step-llama8b": (150, 0, 45),
    "bench-step-cpu-small": (90, 300, 30),
    "bench-loss-llama8b": (90, 0, 25),
    "bench-loss-naive-llama8b": (90, 0, 25),
    "flex-recompile-k5": (120, 0, 45),
    "bench-step-llama8b-2layers": (150, 0, 60),
}
BENCH_ARGS = {
    "bench-step-llama8b": ["step", "--dims", "llama8b"],
    "bench-step-cpu-small": ["step", "--dims", "cpu-small"],
    "bench-loss-llama8b": ["loss", "--dims", "llama8b"],
    "bench-loss-naive-llama8b": ["loss-naive", "--dims", "llama8b"],
    "bench-step-llama8b-2layers": ["step", "--dims", "llama8b", "--num-layers", "2"],
}
CUDA_ONLY = {"bench-step-llama8b", "bench-loss-llama8b", "bench-loss-naive-llama8b",
             "bench-step-llama8b-2layers", "flex-recompile-k5"}  # fmt: skip


def now_iso() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def stub_missing_modules() -> None:
    """The trainer imports tqdm at module level; a stub stands in where it is not installed."""
    try:
        import tqdm  # noqa: F401
    except ImportError:
        mod = types.ModuleType("tqdm")

        class _Bar:
            def __init__(self, *a, **kw):
                pass

            def update(self, *a, **kw):
                pass

            def set_postfix_str(self, *a, **kw):
                pass

            def close(self):
                pass

        mod.tqdm = _Bar
        sys.modules["tqdm"] = mod
        STUBBED.append("tqdm")


def register_pid() -> None:
    piddir = os.environ.get(PIDDIR_ENV)
    if not piddir:
        return
    path = Path(piddir) / str(os.getpid())
    with contextlib.suppress(OSError):
        path.write_text(" ".join(sys.argv))
    import atexit

    atexit.register(lambda: path.unlink(missing_ok=True))


# ---------------------------------------------------------------------------------------------
# Worker side: one check in this process, subchecks recorded one by one into a result file
# ---------------------------------------------------------------------------------------------


class Ctx:
    """What a check worker knows: device, deadline, a scratch folder; records its subchecks."""

    def __init__(self, name: str, result: Path, device: str, deadline: float, work: Path,
                 out: Path):  # fmt: skip
        self.name, self.result_path, self.device = name, result, device
        self.deadline, self.work, self.out = deadline, work, out
        self.result = {"check": name, "subchecks": {}, "info": {}}
        self.save()

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        self.result["stubbed_modules"] = list(STUBBED)
        write_json_atomic(self.result_path, self.result)

    def say(self, msg: str) -> None:
        print(f"[{self.name} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def skip(self, sub: str, reason: str) -> None:
        self.result["subchecks"][sub] = {"status": "skipped", "reason": reason}
        self.say(f"{sub}: skipped: {reason}")
        self.save()

    def sub(self, sub: str, fn, *args, **kwargs):
        """Run one subcheck: fn returns a dict of details (raise AssertionError to fail it)."""
        self.say(f"{sub} ...")
        start = time.perf_counter()
        entry: dict = {}
        try:
            entry["details"] = fn(*args, **kwargs)
            entry["status"] = "pass"
        except Exception as e:
            entry["status"] = "fail"
            entry["error"] = f"{type(e).__name__}: {e}"[:4000]
            entry["traceback"] = traceback.format_exc()[-8000:]
        entry["seconds"] = round(time.perf_counter() - start, 2)
        self.result["subchecks"][sub] = entry
        self.save()
        line = f"{sub}: {entry['status'].upper()} ({entry['seconds']} s)"
        if entry["status"] == "fail":
            line += f" {entry['error'][:500]}"
            print(entry["traceback"], flush=True)
        self.say(line)
        return entry


def build_tiny_target(out: Path) -> Path:
    """The tests' tiny Llama (tests/fixtures.TINY_DIMS, 4 layers, hidden 128), no tokenizer."""
    import torch
    from fixtures import TINY_DIMS
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    cfg = LlamaConfig(**TINY_DIMS, vocab_size=1024, bos_token_id=1, eos_token_id=4, pad_token_id=0)
    LlamaForCausalLM(cfg).to(torch.float32).eval().save_pretrained(out)
    return out


def _versions() -> dict:
    import importlib.metadata

    out = {}
    for name in ("torch", "transformers", "safetensors", "numpy", "triton", "tokenizers",
                 "tqdm", "pyyaml", "jsonschema", "tensorboard", "datasets", "huggingface_hub",
                 "vllm", "snakemake"):  # fmt: skip
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def check_env(ctx: Ctx) -> None:
    import importlib
    import platform

    import torch

    info = ctx.result["info"]
    info.update(
        python=sys.version.split()[0], platform=platform.platform(), executable=sys.executable,
        cpu_count=os.cpu_count(), load_avg=os.getloadavg(), torch=torch.__version__,
        torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
        packages=_versions(), threads=torch.get_num_threads(),
    )  # fmt: skip
    import transformers

    info["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device_count=torch.cuda.device_count(), gpu_name=torch.cuda.get_device_name(0),
            capability=list(torch.cuda.get_device_capability(0)),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            bf16_supported=torch.cuda.is_bf16_supported(),
            cudnn=torch.backends.cudnn.version(),
        )  # fmt: skip
        with contextlib.suppress(Exception):
            v = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    # torch.compile (flex attention) needs Triton and a C compiler for its launcher stubs
    info["c_compilers"] = {c: shutil.which(c) for c in ("cc", "gcc", "clang")}
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(Exception):
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,memory.used,driver_version",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20,
            ).stdout.strip()  # fmt: skip
    ctx.save()
    ctx.say(
        f"python {info['python']}, torch {info['torch']} (CUDA {info['torch_cuda']}), "
        f"transformers {info['transformers']}, GPU {info.get('gpu_name', 'none')} "
        f"capability {info.get('capability')}"
    )

    def imports():
        stub_missing_modules()
        out = {}
        for mod in ("speculators.models", "speculators.models.attention",
                    "speculators.models.loss", "speculators.train.distributed",
                    "speculators.train.checkpoint", "speculators.train.data",
                    "speculators.hidden_states.store", "speculators.train.trainer",
                    "model_fixtures", "train_fixtures"):  # fmt: skip
            try:
                importlib.import_module(mod)
                out[mod] = "ok"
            except Exception as e:
                out[mod] = f"{type(e).__name__}: {e}"
        for mod in ("speculators.cli", "speculators.config"):  # not needed here, only recorded
            try:
                importlib.import_module(mod)
                out[mod] = "ok"
            except Exception as e:
                out[mod] = f"{type(e).__name__}: {e} (not needed by these checks)"
        bad = {m: v for m, v in out.items() if v != "ok" and "not needed" not in v}
        out["stubbed"] = list(STUBBED)
        assert not bad, f"imports failed: {bad}"
        return out

    ctx.sub("imports", imports)

    def device_ops():
        from speculators.devices import native_bf16

        dev = torch.device(ctx.device)
        a = torch.randn(512, 512, device=dev)
        b = (a @ a.T).sum().item()
        out = {"device": str(dev), "matmul_sum_finite": math.isfinite(b),
               "native_bf16": native_bf16()}  # fmt: skip
        if dev.type == "cuda":
            with torch.autocast("cuda", torch.bfloat16):
                c = a @ a
            out["autocast_dtype"] = str(c.dtype)
        assert out["matmul_sum_finite"]
        return out

    ctx.sub("device-ops", device_ops)


# ---- attention ------------------------------------------------------------------------------

# (documents' lengths, padding, TTT steps): T = 256 (two 128-blocks) except one T = 200 case
# Compiled flex (dynamic=False) compiles once per (T, KV length) shape, dtype and grad mode: the
# K=4 case compiles KV lengths 256..1024 that the K<4 cases of T 256 reuse; T 200 comes last.
ATTENTION_CASES = [
    ([100, 60, 90], 6, 3),  # tests/test_attention.py's CUDA case
    ([6, 2, 8, 120, 100], 20, 4),
    ([200], 56, 1),
    ([1, 1, 12, 30, 50, 100, 50], 12, 2),
    ([5, 9, 3, 150], 33, 2),  # T = 200: a partial last 128-block
]
BF16_CASES = (0,)  # indices of ATTENTION_CASES also run under bf16 autocast


def _rel(a, b) -> tuple[float, float]:
    """(relative Frobenius error of a against b, max abs difference)."""
    a, b = a.detach().double(), b.detach().double()
    diff = (a - b).norm().item()
    return diff / max(b.norm().item(), 1e-30), (a - b).abs().max().item() if a.numel() else 0.0


def _run_kind(model, batch, steps, kind, device, bf16: bool, grads: bool):
    import torch

    keys = ("input_ids", "aux", "position_ids", "document_ids")
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=bf16)
    model.zero_grad(set_to_none=True)
    out = {}
    # outputs in the grad mode of the loss pass: compiled flex is not compiled a second time
    with contextlib.nullcontext() if grads else torch.no_grad(), autocast:
        hidden = model.unroll(*(batch[k] for k in keys), steps, attention=kind)
        out["hidden"] = [h.detach().float() for h in hidden]
    ctx_grad = contextlib.nullcontext() if grads else torch.no_grad()
    with ctx_grad, autocast:
        loss, stats = model(**batch, ttt_steps=steps, attention=kind)
    out["loss"] = loss.detach().float()
    out["stats"] = {k: float(v) for k, v in stats.items()}
    if grads:
        loss.backward()
        out["grads"] = {
            n: p.grad.detach().float().clone()
            for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None
        }
    return out


def _compare(ref, got, tol: dict) -> dict:
    """Errors of `got` against `ref`; AssertionError naming what is out of tolerance."""
    import torch

    d = {}
    d["loss_ref"], d["loss"] = ref["loss"].item(), got["loss"].item()
    d["loss_rel"] = abs(d["loss"] - d["loss_ref"]) / max(abs(d["loss_ref"]), 1e-30)
    d["hidden_rel"], d["hidden_maxabs"] = map(
        max, zip(*(_rel(g, r) for g, r in zip(got["hidden"], ref["hidden"], strict=True)))
    )
    d["finite"] = bool(all(torch.isfinite(h).all() for h in got["hidden"])) and math.isfinite(
        d["loss"]
    )
    counts = {k: (ref["stats"][k], got["stats"][k]) for k in ref["stats"] if not k.startswith("kl")}
    d["count_mismatch"] = {
        k: v for k, v in counts.items() if k.startswith("count") and v[0] != v[1]
    }
    acc = {k: v for k, v in counts.items() if k.startswith(("full", "prev")) and v[0] != v[1]}
    d["acc_mismatch"] = acc
    total = max(ref["stats"].get("count_0", 1.0), 1.0)
    if "grads" in ref and "grads" in got:
        worst = ("", 0.0, 0.0)
        missing = sorted(set(ref["grads"]) ^ set(got["grads"]))
        for n in ref["grads"]:
            if n in got["grads"]:
                rel, mx = _rel(got["grads"][n], ref["grads"][n])
                if rel > worst[1]:
                    worst = (n, rel, mx)
        d["grad_worst"], d["grad_rel"], d["grad_maxabs"] = worst
        d["grad_missing"] = missing
    problems = []
    if not d["finite"]:
        problems.append("non-finite outputs or loss")
    if d["loss_rel"] > tol["loss"]:
        problems.append(f"loss rel error {d['loss_rel']:.3g} > {tol['loss']}")
    if d["hidden_rel"] > tol["hidden"] and d["hidden_maxabs"] > tol.get("atol", 0):
        problems.append(f"outputs rel error {d['hidden_rel']:.3g} > {tol['hidden']}")
    if d["count_mismatch"]:
        problems.append(f"supervised counts differ {d['count_mismatch']}")
    if tol.get("acc_exact") and any(abs(a - b) > 0.005 * total for a, b in acc.values()):
        problems.append(f"greedy-correct counts differ by >0.5% {acc}")
    if "grad_rel" in d:
        if d["grad_missing"]:
            problems.append(f"gradients only on one side: {d['grad_missing']}")
        if d["grad_rel"] > tol["grad"] and d["grad_maxabs"] > tol.get("atol", 0):
            problems.append(f"grad {d['grad_worst']} rel error {d['grad_rel']:.3g} > {tol['grad']}")
    assert not problems, "; ".join(problems) + f" | {json.dumps(d, default=str)}"
    return d


def check_attention(ctx: Ctx) -> None:
    import warnings

    import torch
    from model_fixtures import packed_batch, tiny_draft

    from speculators.models import attention as A

    device = torch.device(ctx.device)
    kinds = [k for k in getattr(A, "KINDS", ("dense", "flex")) if k not in ("auto", "dense")]
    info = ctx.result["info"]
    info["kinds"] = kinds
    if hasattr(A, "resolve_kind"):
        info["auto_resolves_to"] = A.resolve_kind("auto", device)
    dynamo = getattr(torch, "_dynamo", None)
    if ctx.cuda and dynamo is not None:
        # every (T, KV length) pair is a recompile (dynamic=False); the default limit of 8
        # would silently fall back to eager flex for the later cases
        with contextlib.suppress(Exception):
            info["recompile_limit_was"] = dynamo.config.recompile_limit
            dynamo.config.recompile_limit = 64
    target = build_tiny_target(ctx.work / "target")
    model = tiny_draft(target, num_layers=2).to(device)
    fp32_tol = {"loss": 1e-4, "hidden": 1e-4, "grad": 1e-3, "atol": 1e-6, "acc_exact": True}
    bf16_tol = {"loss": 1e-2, "hidden": 3e-2, "grad": 1e-1, "atol": 1e-4}

    def run_checked(batch, steps, kind, bf16, grads):
        """_run_kind; on CUDA, flex falling back to its unfused eager path is a failure."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = _run_kind(model, batch, steps, kind, device, bf16, grads)
            if ctx.cuda:
                torch.cuda.synchronize()
        eager = [str(w.message)[:200] for w in caught
                 if "called without torch.compile" in str(w.message)]  # fmt: skip
        if ctx.cuda and kind == "flex" and eager:
            raise AssertionError(f"flex ran un-compiled on CUDA: {eager[:1]}")
        return got

    for i, (lengths, pad, steps) in enumerate(ATTENTION_CASES):
        batch = {k: v.to(device) for k, v in packed_batch(model, lengths, pad=pad, seed=i).items()}
        case = f"T{sum(lengths) + pad}-docs{len(lengths)}-pad{pad}-K{steps}"
        ref_holder = {}

        def reference(batch=batch, steps=steps, holder=ref_holder):
            holder["ref"] = _run_kind(model, batch, steps, "dense", device, False, True)
            return {"loss": holder["ref"]["loss"].item(), "stats": holder["ref"]["stats"]}

        if ctx.sub(f"{case}/dense-fp32", reference)["status"] != "pass":
            continue
        for kind in kinds:
            grads = not (kind == "flex" and not ctx.cuda)  # flex has no CPU backward
            name = f"{case}/{kind}-fp32" + ("" if ctx.cuda or kind != "flex" else "-eager-nograd")
            if ctx.left() < 15:
                ctx.skip(name, "out of time for this check")
                continue

            def compare(batch=batch, steps=steps, kind=kind, grads=grads, holder=ref_holder):
                ref = holder["ref"]
                if not grads:
                    ref = {k: v for k, v in ref.items() if k != "grads"}
                t0 = time.perf_counter()
                got = run_checked(batch, steps, kind, False, grads)
                first_s = time.perf_counter() - t0
                d = _compare(ref, got, fp32_tol)
                d["seconds_incl_compile"] = round(first_s, 2)
                return d

            ctx.sub(name, compare)
        if i in BF16_CASES:
            if ctx.left() < 20:
                ctx.skip(f"{case}/bf16", "out of time for this check")
                continue
            bf16_kinds = ["dense"] + [k for k in kinds if ctx.cuda or k != "flex"]
            if not ctx.cuda:
                ctx.skip(f"{case}/flex-bf16", "no CUDA (flex has no CPU backward)")
            for kind in bf16_kinds:

                def compare_bf16(batch=batch, steps=steps, kind=kind, holder=ref_holder):
                    got = run_checked(batch, steps, kind, True, True)
                    d = _compare(holder["ref"], got, bf16_tol)
                    if kind == "dense":
                        holder["dense_bf16"] = d
                    elif "dense_bf16" in holder:  # bf16 rounding of dense SDPA as the yardstick
                        base = holder["dense_bf16"]
                        d["hidden_rel_vs_dense_bf16"] = d["hidden_rel"] / max(
                            base["hidden_rel"], 1e-30
                        )
                        d["grad_rel_vs_dense_bf16"] = d["grad_rel"] / max(base["grad_rel"], 1e-30)
                    return d

                ctx.sub(f"{case}/{kind}-bf16-autocast-vs-dense-fp32", compare_bf16)
    if not ctx.cuda:
        ctx.skip("compiled-flex", "no CUDA (compiled flex attention needs a GPU)")
    if dynamo is not None:
        with contextlib.suppress(Exception):
            info["dynamo_unique_graphs"] = dynamo.utils.counters["stats"]["unique_graphs"]
    if ctx.cuda:
        info["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    ctx.save()


# ---- training under torchrun ----------------------------------------------------------------


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _strip(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in recs]


def _num_diff(a, b) -> float:
    """Largest relative difference between two nested records (inf if their structure differs)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return math.inf
        return max((_num_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return math.inf
        return max((_num_diff(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if a == b:
            return 0.0
        if not (math.isfinite(a) and math.isfinite(b)):
            return math.inf
        return abs(a - b) / max(abs(a), abs(b), 1e-12)
    return 0.0 if a == b else math.inf


def train_worker(spec_path: str) -> int:
    """Runs under torchrun: the scenarios of one launch, one after the other, in this process."""
    register_pid()
    stub_missing_modules()
    import logging

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S", stream=sys.stdout,
    )  # fmt: skip
    import torch

    from speculators.train import distributed, trainer

    spec = json.loads(Path(spec_path).read_text())
    env = distributed.init()
    print(f"[train-worker] rank {env.rank}/{env.world_size} on {env.device}, backend "
          f"{torch.distributed.get_backend() if env.distributed else None}", flush=True)  # fmt: skip
    real_step, real_parallelize = trainer.train_step, distributed.parallelize

    class PlannedCrash(RuntimeError):
        pass

    for sc in spec["scenarios"]:
        work = Path(sc["dir"])
        work.mkdir(parents=True, exist_ok=True)
        result = {"name": sc["name"], "fsdp_forced": sc.get("fsdp", False), "pid": os.getpid()}
        calls: list[int] = []
        start = time.perf_counter()
        try:
            crash_at = None
            if sc.get("crash_ref"):
                ref = _records(Path(sc["crash_ref"]) / "draft" / "metrics.jsonl")
                n0 = sum(r["split"] == "train" and r["epoch"] == 0 for r in ref)
                crash_at = n0 + 5  # call n0+5 raises: epoch 1, after a mid-epoch checkpoint
                result.update(crash_at=crash_at, steps_epoch0=n0)

            def step(*a, _crash=crash_at, _calls=calls, **kw):
                _calls.append(1)
                if _crash is not None and len(_calls) == _crash:
                    raise PlannedCrash(f"planned crash at train_step call {_crash}")
                return real_step(*a, **kw)

            def parallelize(model, env_, _result=result):
                # FSDP2 on this single rank: parallelize() shards only when world_size > 1
                out = real_parallelize(model, dataclasses.replace(env_, world_size=2))
                _result["model_class_after_parallelize"] = type(out).__name__
                return out

            argv = [
                "--target", spec["target"], "--data", spec["data"], "--d2t", spec["d2t"],
                "--t2d", spec["t2d"], "--output", str(work / "draft"), "--work-dir",
                str(work / "work"), *map(str, spec["train_args"]), "--loggers",
            ]  # fmt: skip
            parser = argparse.ArgumentParser()
            trainer.add_arguments(parser)
            args = parser.parse_args(argv)
            trainer.train_step = step
            if sc.get("fsdp"):
                distributed.parallelize = parallelize
            if env.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            print(f"[train-worker] scenario {sc['name']} starts (crash at call {crash_at})",
                  flush=True)  # fmt: skip
            trainer.train(args, env)
            result["status"] = "finished"
        except PlannedCrash as e:
            result["status"] = "crashed-as-planned"
            result["error"] = str(e)
        except Exception as e:
            result["status"] = "error"
            result["error"] = f"{type(e).__name__}: {e}"[:4000]
            result["traceback"] = traceback.format_exc()[-8000:]
            print(result["traceback"], flush=True)
        finally:
            trainer.train_step, distributed.parallelize = real_step, real_parallelize
        result["calls"] = len(calls)
        result["seconds"] = round(time.perf_counter() - start, 2)
        if env.device.type == "cuda":
            result["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["stubbed_modules"] = list(STUBBED)
        write_json_atomic(work / f"result-{sc['name']}.json", result)
        print(f"[train-worker] scenario {sc['name']}: {result['status']} "
              f"({result['calls']} steps, {result['seconds']} s)", flush=True)  # fmt: skip
    distributed.shutdown()
    return 0


def _kill_registered(piddir: Path) -> list[int]:
    """Stop the processes of this check that are still alive (only our own: their command line
    names this script), SIGTERM first so torchrun stops its workers, then SIGKILL."""

    def alive() -> list[int]:
        pids = []
        for f in piddir.glob("*") if piddir.is_dir() else []:
            with contextlib.suppress(Exception):
                pid = int(f.name)
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                if pid != os.getpid() and "gpu_checks.py" in cmdline:
                    pids.append(pid)
                    continue
            f.unlink(missing_ok=True)
        return pids

    stopped = []
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 1.0), (signal.SIGKILL, 0.0)):
        pids = alive()
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        stopped += [p for p in pids if p not in stopped]
        end = time.time() + wait
        while time.time() < end and alive():
            time.sleep(0.2)
    return stopped


def _stop_group(proc, grace: float = 12.0) -> None:
    """SIGTERM the child's process group (torchrun then stops its workers), SIGKILL after grace."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_streaming(cmd, env, limit: float, prefix: str, log=print, cwd=None) -> dict:
    """Run cmd in its own session, echoing its output as it comes; kill it past `limit` seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace",
                            start_new_session=True)  # fmt: skip
    piddir = (env or os.environ).get(PIDDIR_ENV)
    if piddir:  # a torchrun in its own session: the parent can still find and stop it
        with contextlib.suppress(OSError):
            (Path(piddir) / str(proc.pid)).write_text(" ".join(map(str, cmd)))
    tail: deque[str] = deque(maxlen=400)

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log(f"{prefix}{line}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(1.0, limit))
    except subprocess.TimeoutExpired:
        timed_out = True
        log(f"{prefix}*** time limit {limit:.0f} s reached: stopping it")
        _stop_group(proc)
    except BaseException:  # we are being stopped: stop the child first (torchrun: gracefully)
        _stop_group(proc)
        raise
    reader.join(timeout=5)
    return {"rc": proc.returncode, "timed_out": timed_out,
            "seconds": round(time.perf_counter() - start, 2), "tail": list(tail)}  # fmt: skip


def check_train(ctx: Ctx) -> None:
    import random

    import torch
    from train_fixtures import write_random_states, write_vocab

    info = ctx.result["info"]
    root = ctx.work
    target = build_tiny_target(root / "target")
    rng = random.Random(0)
    lengths = [rng.randint(24, 120) for _ in range(40)]
    data = write_random_states(root / "hs", target, lengths, random_masks=True)
    vocab = json.loads((target / "config.json").read_text())["vocab_size"]
    d2t, t2d = write_vocab(root / "vocab", vocab, 128, data)
    precision = "bf16" if ctx.cuda else "auto"
    train_args = ["--total-seq-len", 256, "--epochs", 2, "--checkpoint-every", 3, "--lr", 1e-3,
                  "--noise", 0.05, "--num-layers", 2, "--ttt-steps", 3, "--precision", precision,
                  "--val-fraction", 0.1, "--seed", 0]  # fmt: skip
    base = {"target": str(target), "data": str(data), "d2t": str(d2t), "t2d": str(t2d),
            "train_args": train_args}  # fmt: skip
    info.update(samples=len(lengths), tokens=sum(lengths), train_args=train_args,
                backend="nccl" if ctx.cuda else "gloo", nproc_per_node=1,
                note="world size 1: trainer's parallelize() does not shard; the fsdp2-forced "
                     "scenarios call it as if world_size were 2 (fully_shard on a 1-rank mesh); "
                     "real multi-rank FSDP2 on CUDA needs >= 2 GPUs")  # fmt: skip
    ctx.save()
    sdir = {n: root / "runs" / n for n in
            ("full", "crash", "fsdp-full", "fsdp-crash")}  # fmt: skip
    sdir["resume"], sdir["fsdp-resume"] = sdir["crash"], sdir["fsdp-crash"]

    def launch(tag: str, scenarios: list[dict]) -> dict:
        spec = root / f"spec-{tag}.json"
        write_json_atomic(spec, {**base, "scenarios": scenarios})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "1", str(Path(__file__).resolve()), "--train-worker",
               str(spec)]  # fmt: skip
        limit = ctx.left() - 5
        ctx.say(f"launch {tag}: {[s['name'] for s in scenarios]} (limit {limit:.0f} s)")
        res = run_streaming(cmd, os.environ.copy(), limit, f"[{ctx.name}:{tag}] ")
        res.pop("tail")
        killed = _kill_registered(Path(os.environ.get(PIDDIR_ENV, "/nonexistent")))
        if killed:
            res["killed_leftover_pids"] = killed
        info[f"launch-{tag}"] = res
        ctx.save()
        return res

    def scenario(name: str) -> dict:
        path = sdir[name] / f"result-{name}.json"
        if not path.is_file():
            raise AssertionError(f"scenario {name} left no result (crashed or timed out)")
        return json.loads(path.read_text())

    def keep_metrics(name: str) -> None:
        src = sdir[name] / "draft" / "metrics.jsonl"
        if src.is_file():
            dst = ctx.out / "train_metrics"
            dst.mkdir(exist_ok=True)
            shutil.copy(src, dst / f"{name}.jsonl")

    def check_full(name: str) -> dict:
        r = scenario(name)
        assert r["status"] == "finished", r
        keep_metrics(name)
        recs = _records(sdir[name] / "draft" / "metrics.jsonl")
        train = [x for x in recs if x["split"] == "train"]
        val = [x for x in recs if x["split"] == "val"]
        losses = [x["loss"] for x in train]
        assert all(x is not None and math.isfinite(x) for x in losses), losses
        assert len(val) == 2, f"{len(val)} validation records, expected 2"
        steps = [sum(x["epoch"] == e for x in train) for e in (0, 1)]
        assert steps[1] >= 7, f"epoch 1 has {steps[1]} steps; the crash needs >= 7"
        summary = json.loads((sdir[name] / "draft" / "train_summary.json").read_text())
        return {**{k: v for k, v in r.items() if k != "traceback"}, "steps_per_epoch": steps,
                "first_loss": losses[0], "last_loss": losses[-1],
                "val_loss": [x["loss"] for x in val], "summary": summary}  # fmt: skip

    def check_resume(full: str, crashed: str, resumed: str) -> dict:
        c, r = scenario(crashed), scenario(resumed)
        assert c["status"] == "crashed-as-planned", c
        assert r["status"] == "finished", r
        keep_metrics(resumed)
        n0, crash_at, every = c["steps_epoch0"], c["crash_at"], 3
        saved = [g for g in range(n0 + 1, crash_at) if g % every == 0]
        assert saved, "no mid-epoch checkpoint before the crash"
        full_recs = _records(sdir[full] / "draft" / "metrics.jsonl")
        total = sum(x["split"] == "train" for x in full_recs)
        expected_calls = total - max(saved)
        res_recs = _records(sdir[resumed] / "draft" / "metrics.jsonl")
        exact = _strip(res_recs) == _strip(full_recs)
        diff = 0.0 if exact else _num_diff(_strip(res_recs), _strip(full_recs))
        a = torch.load(sdir[full] / "work" / "best_model.pt", weights_only=True)
        b = torch.load(sdir[resumed] / "work" / "best_model.pt", weights_only=True)
        assert a.keys() == b.keys(), (sorted(a), sorted(b))
        w_exact = all(torch.equal(a[k], b[k]) for k in a)
        w_diff = max(_rel(b[k].float(), a[k].float())[0] for k in a)
        out = {"crash_at_call": crash_at, "resumed_from_step": max(saved),
               "resumed_calls": r["calls"], "expected_calls": expected_calls,
               "metrics_bit_exact": exact, "metrics_max_rel_diff": diff,
               "best_weights_bit_exact": w_exact, "best_weights_max_rel_diff": w_diff,
               "resume_seconds": r["seconds"]}  # fmt: skip
        assert r["calls"] == expected_calls, f"resumed {r['calls']} steps: {out}"
        # bit-exact is expected (same kernels, same data, same RNG); tolerate GPU reduction-order
        # noise only
        assert diff <= 1e-3 and w_diff <= 1e-3, f"resumed run differs: {out}"
        return out

    def check_fsdp_vs_plain() -> dict:
        r = scenario("fsdp-full")
        assert r.get("model_class_after_parallelize", "").startswith("FSDP"), r
        plain = [x["loss"] for x in _records(sdir["full"] / "draft" / "metrics.jsonl")
                 if x["split"] == "train"]  # fmt: skip
        fsdp = [x["loss"] for x in _records(sdir["fsdp-full"] / "draft" / "metrics.jsonl")
                if x["split"] == "train"]  # fmt: skip
        assert len(plain) == len(fsdp)
        rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(plain, fsdp)]
        out = {"model_class": r["model_class_after_parallelize"], "first_step_rel": rel[0],
               "max_rel_all_steps": max(rel), "note": "bf16 gathered params vs fp32 params "
               "under autocast on CUDA; identical math on CPU"}  # fmt: skip
        assert rel[0] <= 2e-2, f"first-step loss differs: {out}"
        return out

    # launch A: full run, then the run that crashes mid-epoch 1 (its reference: the full run)
    launch("A", [{"name": "full", "dir": str(sdir["full"])},
                 {"name": "crash", "dir": str(sdir["crash"]), "crash_ref": str(sdir["full"])}])  # fmt: skip
    full_ok = ctx.sub("run-full", check_full, "full")["status"] == "pass"
    a_seconds = info["launch-A"]["seconds"]
    if not full_ok:
        ctx.skip("crash-and-resume", "the full run failed")
        ctx.skip("fsdp2-forced", "the full run failed")
        return
    # launch B: the resume (a fresh process), then FSDP2-forced full and crash if time allows
    with_fsdp = ctx.left() > 1.6 * a_seconds + 20
    scen_b = [{"name": "resume", "dir": str(sdir["resume"])}]
    if with_fsdp:
        scen_b += [{"name": "fsdp-full", "dir": str(sdir["fsdp-full"]), "fsdp": True},
                   {"name": "fsdp-crash", "dir": str(sdir["fsdp-crash"]), "fsdp": True,
                    "crash_ref": str(sdir["fsdp-full"])}]  # fmt: skip
    launch("B", scen_b)
    ctx.sub("crash-and-resume", check_resume, "full", "crash", "resume")
    if not with_fsdp:
        ctx.skip("fsdp2-forced", "out of time for this check")
        return
    if ctx.sub("fsdp2-forced-full", check_full, "fsdp-full")["status"] == "pass":
        ctx.sub("fsdp2-forced-vs-plain", check_fsdp_vs_plain)
    if ctx.left() < 0.5 * a_seconds + 15:
        ctx.skip("fsdp2-forced-crash-and-resume", "out of time for this check")
        return
    launch("C", [{"name": "fsdp-resume", "dir": str(sdir["fsdp-resume"]), "fsdp": True}])
    ctx.sub("fsdp2-forced-crash-and-resume", check_resume, "fsdp-full", "fsdp-crash",
            "fsdp-resume")  # fmt: skip


def check_recompile(ctx: Ctx) -> None:
    """What the trainer does with ttt_steps 5: K training shapes (grad) and K validation shapes
    (no_grad) of the compiled flex function, 2K > dynamo's default recompile_limit (8), which
    speculators.models.attention raises when it compiles flex."""
    import warnings

    import torch
    from model_fixtures import packed_batch, tiny_draft

    target = build_tiny_target(ctx.work / "target")
    model = tiny_draft(target, num_layers=1).cuda()
    batch = {k: v.cuda() for k, v in packed_batch(model, [60, 50], pad=18).items()}
    steps = 5

    def run():
        from torch._dynamo.utils import counters

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.autocast("cuda", torch.bfloat16):
                loss, _ = model(**batch, ttt_steps=steps)
            loss.backward()
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                model(**batch, ttt_steps=steps)
            torch.cuda.synchronize()
        eager = [str(w.message)[:120] for w in caught
                 if "called without torch.compile" in str(w.message)]  # fmt: skip
        out = {"ttt_steps": steps, "T": 128,
               "recompile_limit": torch._dynamo.config.recompile_limit,
               "unique_graphs": counters["stats"]["unique_graphs"],
               "flex_fell_back_to_unfused_eager": bool(eager)}  # fmt: skip
        assert not eager, (
            f"package issue: with ttt_steps {steps} training + validation compile {2 * steps} "
            f"flex graphs > recompile_limit, the rest run unfused (full score matrices): {out}"
        )
        return out

    ctx.sub("train-and-validation-shapes", run)


WORKERS = {
    "env": check_env,
    "attention": check_attention,
    "train": check_train,
    "flex-recompile-k5": check_recompile,
}


def worker_main(args) -> int:
    register_pid()

    def on_term(signum, frame):  # unwinds through run_streaming, which stops our torchrun
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_term)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    ctx = Ctx(args.worker, Path(args.result), args.device, args.deadline, Path(args.work),
              Path(args.out))  # fmt: skip
    try:
        WORKERS[args.worker](ctx)
    except Exception as e:
        ctx.result["error"] = f"{type(e).__name__}: {e}"[:4000]
        ctx.result["traceback"] = traceback.format_exc()[-8000:]
        ctx.save()
        print(ctx.result["traceback"], flush=True)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# Parent side: runs the checks one by one within the total budget, writes OUT/gpu_checks.json
# ---------------------------------------------------------------------------------------------


class Parent:
    def __init__(self, out: Path, budget: float, device_arg: str):
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(out / "gpu_checks.log", "a", buffering=1)
        self.start = time.time()
        self.deadline = self.start + budget
        self.work = Path(tempfile.mkdtemp(prefix="gpu_checks_"))
        self.results = {"script": "benchmarks/gpu_checks.py", "argv": sys.argv[1:],
                        "started": now_iso(), "budget_s": budget, "device_arg": device_arg,
                        "device": None, "status": "running", "checks": {}}  # fmt: skip
        self.lock = threading.Lock()

    def log(self, msg: str) -> None:
        with self.lock:
            print(msg, flush=True)
            self.log_file.write(msg + "\n")

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.time() - self.start, 1)
        write_json_atomic(self.out / "gpu_checks.json", self.results)

    def record(self, name: str, entry: dict) -> None:
        self.results["checks"][name] = entry
        self.save()
        line = f"== {name}: {entry['status'].upper()}"
        if "seconds" in entry:
            line += f" ({entry['seconds']} s)"
        if entry.get("reason"):
            line += f" ({entry['reason']})"
        if entry.get("error"):
            line += f" {entry['error'][:300]}"
        self.log(line)

    def child_env(self, device: str, piddir: Path) -> dict:
        env = os.environ.copy()
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), str(TESTS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        env["PYTHONUNBUFFERED"] = "1"
        env[PIDDIR_ENV] = str(piddir)
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def limit_for(self, name: str, device: str) -> tuple[float, str | None]:
        cuda_s, cpu_s, least = LIMITS[name]
        own = cuda_s if device == "cuda" else cpu_s
        left = self.deadline - time.time() - 5
        if left < least:
            return 0, f"out of time budget ({left:.0f} s left, needs >= {least} s)"
        return min(own, left), None

    def run_worker(self, name: str, device: str) -> dict:
        limit, why = self.limit_for(name, device)
        if why:
            return {"status": "skipped", "reason": why}
        self.log(f"== {name}: starting (limit {limit:.0f} s, {self.left():.0f} s left in budget)")
        piddir = self.work / f"pids-{name}"
        piddir.mkdir(exist_ok=True)
        work = self.work / name
        work.mkdir(exist_ok=True)
        result = self.work / f"{name}.result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--result",
               str(result), "--device", device, "--deadline", str(time.time() + limit),
               "--work", str(work), "--out", str(self.out)]  # fmt: skip
        res = run_streaming(cmd, self.child_env(device, piddir), limit + 5, f"  [{name}] ",
                            log=self.log, cwd=REPO)  # fmt: skip
        killed = _kill_registered(piddir)
        entry = {"seconds": res["seconds"], "rc": res["rc"]}
        if killed:
            entry["killed_leftover_pids"] = killed
        if result.is_file():
            entry.update(json.loads(result.read_text()))
        subs = entry.get("subchecks", {})
        failed = [k for k, v in subs.items() if v["status"] == "fail"]
        entry["failed_subchecks"] = failed
        if res["timed_out"]:
            entry.update(status="fail", error=f"timed out after {limit:.0f} s")
        elif res["rc"] != 0 or failed or not result.is_file():
            entry["status"] = "fail"
            entry.setdefault(
                "error",
                f"failed subchecks: {failed}" if failed else f"exit status {res['rc']}",
            )
        else:
            entry["status"] = "pass"
        if entry["status"] == "fail":
            entry["output_tail"] = res["tail"][-60:]
        return entry

    def run_bench(self, name: str, device: str) -> dict:
        limit, why = self.limit_for(name, device)
        if why:
            return {"status": "skipped", "reason": why}
        argv = [*BENCH_ARGS[name], "--device", device]
        if device == "cpu":
            argv += ["--steps", "1"]  # CPU: only exercise the code path
        cmd = [sys.executable, str(REPO / "benchmarks" / "train_step.py"), *argv, "--json"]
        self.log(f"== {name}: starting {' '.join(cmd[1:])} (limit {limit:.0f} s)")
        piddir = self.work / f"pids-{name}"
        piddir.mkdir(exist_ok=True)
        res = run_streaming(cmd, self.child_env(device, piddir), limit, f"  [{name}] ",
                            log=self.log, cwd=REPO)  # fmt: skip
        entry = {"seconds": res["seconds"], "rc": res["rc"], "command": " ".join(cmd[1:])}
        parsed = None
        for line in reversed(res["tail"]):
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    parsed = json.loads(line)
                    break
        entry["result"] = parsed
        if res["timed_out"]:
            entry.update(status="fail", error=f"timed out after {limit:.0f} s")
        elif res["rc"] != 0 or parsed is None:
            entry.update(status="fail", error=f"exit status {res['rc']}, JSON line: {parsed}")
        else:
            entry["status"] = "pass"
        if entry["status"] == "fail":
            entry["output_tail"] = res["tail"][-60:]
        return entry

    def left(self) -> float:
        return self.deadline - time.time()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_checks_out"),
                   help="folder for gpu_checks.json and gpu_checks.log (default $OUT)")  # fmt: skip
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--budget", type=float, default=400.0,
                   help="seconds for everything; checks that no longer fit are skipped")  # fmt: skip
    p.add_argument("--only", nargs="+", choices=list(LIMITS), help="run only these checks")
    p.add_argument("--skip", nargs="+", choices=list(LIMITS), default=[])
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--train-worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.train_worker:
        return train_worker(args.train_worker)
    if args.worker:
        return worker_main(args)

    parent = Parent(args.out.resolve(), args.budget, args.device)
    wanted = [n for n in LIMITS if (not args.only or n in args.only) and n not in args.skip]
    parent.log(f"gpu_checks: {now_iso()}, budget {args.budget:.0f} s, out {parent.out}, "
               f"checks {wanted}, python {sys.executable}")  # fmt: skip

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        # env always runs: it tells whether CUDA is there
        entry = parent.run_worker("env", "cuda" if args.device == "cuda" else "cpu")
        cuda = bool(entry.get("info", {}).get("cuda_available"))
        device = {"auto": "cuda" if cuda else "cpu", "cuda": "cuda", "cpu": "cpu"}[args.device]
        if device == "cuda" and not cuda:
            entry.update(status="fail", error="--device cuda but torch sees no CUDA device")
        parent.results["device"] = device
        if "env" in wanted or device == "cpu" or entry["status"] == "fail":
            parent.record("env", entry)
        parent.log(f"gpu_checks: device {device}")
        for name in wanted:
            if name == "env":
                continue
            if name in CUDA_ONLY and device != "cuda":
                parent.record(name, {"status": "skipped", "reason": "no CUDA"})
                continue
            if name in WORKERS:
                parent.record(name, parent.run_worker(name, device))
            else:
                parent.record(name, parent.run_bench(name, device))
    except KeyboardInterrupt as e:
        parent.results["interrupted"] = str(e) or "interrupted"
        parent.log(f"gpu_checks: interrupted ({e})")
    finally:
        checks = parent.results["checks"]
        failed = [n for n, c in checks.items() if c["status"] == "fail"]
        parent.results["failed"] = failed
        parent.results["skipped_out_of_time"] = [
            n for n, c in checks.items() if "out of time" in c.get("reason", "")
        ]
        parent.results["status"] = "fail" if failed or "interrupted" in parent.results else "pass"
        parent.results["finished"] = now_iso()
        parent.save()
        parent.log("gpu_checks summary:")
        for n, c in checks.items():
            extra = c.get("reason") or c.get("error") or ""
            parent.log(f"  {n:28s} {c['status']:8s} {c.get('seconds', '')!s:>8} {extra[:160]}")
        if parent.results["skipped_out_of_time"]:
            parent.log(f"gpu_checks: not run for lack of time: "
                       f"{parent.results['skipped_out_of_time']} (rerun them with --only)")  # fmt: skip
        parent.log(f"gpu_checks: {parent.results['status'].upper()} in "
                   f"{parent.results['elapsed_s']} s -> {parent.out / 'gpu_checks.json'}")  # fmt: skip
        if not args.keep_work:
            shutil.rmtree(parent.work, ignore_errors=True)
        else:
            parent.log(f"scratch kept: {parent.work}")
    return 1 if parent.results["status"] != "pass" else 0


if __name__ == "__main__":
    sys.exit(main())
