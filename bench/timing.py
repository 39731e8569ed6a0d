"""Step timing and the JSON record, shared by our runner and the reference runner (torch only:
each runs in its own venv)."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.cases import H200_BF16_DENSE_PEAK, Case, step_flops


def time_steps(step: Callable[[torch.Tensor, int], None], case: Case, warmup: int, steps: int) -> list[float]:
    """Seconds per step of `step(tokens, step_index)` on random token ids (batch, seq_len):
    `warmup` untimed calls, then `steps` calls back to back, as in training (the GPU is
    synchronized only at both ends, so host work overlaps device work). Returned per step on
    CPU; on GPU, the mean of the timed block repeated for each step."""
    device = torch.device(case.device)
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, case.shape.d_vocab, (case.batch_size, case.seq_len), generator=generator).to(device)
        for _ in range(min(warmup + steps, 4))
    ]
    for index in range(warmup):
        step(batches[index % len(batches)], index)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    block_start = time.perf_counter()
    for index in range(warmup, warmup + steps):
        start = time.perf_counter()
        step(batches[index % len(batches)], index)
        times.append(time.perf_counter() - start)
    _sync(device)
    if device.type == "cuda":
        return [(time.perf_counter() - block_start) / steps] * steps
    return times


def record(impl: str, case: Case, arm: str, precision: str, times: list[float], **extra: object) -> dict:
    """One result line: median step time, tokens/s, model FLOPs, and on GPU MFU and peak memory
    (of the timed steps)."""
    device = torch.device(case.device)
    seconds = statistics.median(times)
    flops = step_flops(case, arm)
    result = {
        "impl": impl,
        "case": case.name,
        "arm": arm,
        "precision": precision,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "batch_size": case.batch_size,
        "seq_len": case.seq_len,
        "n_dict": case.n_dict,
        "step_s": seconds,
        "step_s_range": [min(times), max(times)],
        "tokens_per_s": case.tokens_per_step / seconds,
        "model_tflops_per_step": flops / 1e12,
        **extra,
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["mfu_vs_bf16_peak"] = flops / seconds / H200_BF16_DENSE_PEAK
    return result


def emit(result: dict, out: Path | None) -> None:
    """Print one JSON line and append it to `out`."""
    line = json.dumps(result)
    print(line, flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(line + "\n")


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
