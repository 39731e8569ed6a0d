"""Peak memory of one training step of the GPU case, estimated on a CPU (no GPU at hand).

    python -m bench.cpu_memory [--arms e2e e2e_ds] [--batch-sizes 1 2] [--compile]

Each (arm, batch size) runs in a fresh process: two training steps of the `gpt2-small-gpu`
shape (layer 6, dictionary 60 x 768, 1024 tokens per sequence, random weights) in float32 on
CPU, and reports the process's peak resident memory. Peak memory is linear in the batch
(activations and logits scale with it; weights, SAE, gradients and Adam state do not), so two
batch sizes give the fixed part and the per-sequence slope, extrapolated to the case's batch of
16. On a GPU with bf16 autocast the saved activations are smaller, so this float32 figure is an
upper bound for `bench/gpu_check.sh`'s measured one. One JSON line per arm.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
from pathlib import Path

from bench.cases import CASES

CASE = CASES["gpt2-small-gpu"]


def measure(arm: str, batch_size: int, compiled: bool) -> dict:
    """In this process: two CPU training steps at `batch_size`; peak RSS in GiB."""
    import torch

    from bench.ours import random_model, train_config
    from sparsify.training.batches import MicroBatch
    from sparsify.training.build import build_model
    from sparsify.training.objective import make_loss_plan
    from sparsify.training.trainer import forward_backward, optimizer_step

    case = dataclasses.replace(CASE, device="cpu", batch_size=batch_size)
    cfg = train_config(case, arm, "float32", compiled).model_copy(update={"device": "cpu"})
    model = build_model(cfg, random_model(case, torch.device("cpu")))
    plan = make_loss_plan(model, cfg.loss, compiled=compiled)
    optimizer = torch.optim.Adam(model.saes.parameters(), lr=cfg.lr)
    tokens = torch.randint(0, case.shape.d_vocab, (batch_size, case.seq_len))
    for step in range(2):  # the second step holds Adam's state during its forward and backward
        forward_backward(model, MicroBatch(tokens), plan, cfg)
        optimizer_step(model, optimizer, cfg, step)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"arm": arm, "batch_size": batch_size, "peak_rss_gib": peak_gib}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=["e2e", "e2e_ds"])
    parser.add_argument("--batch-sizes", nargs=2, type=int, default=[1, 2])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("ARM", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="append JSON lines here (also printed)")
    args = parser.parse_args(argv)
    if len(set(args.batch_sizes)) != 2:
        parser.error("--batch-sizes: give two different batch sizes (the slope needs two points)")
    if args.worker:
        print(json.dumps(measure(args.worker[0], int(args.worker[1]), args.compile)))
        return 0
    for arm in args.arms:
        peaks = {}
        for batch in args.batch_sizes:
            command = [sys.executable, "-m", "bench.cpu_memory", "--worker", arm, str(batch)]
            output = subprocess.run(
                command + (["--compile"] if args.compile else []), capture_output=True, text=True, check=True
            ).stdout
            peaks[batch] = json.loads(output.strip().splitlines()[-1])["peak_rss_gib"]
        (b1, p1), (b2, p2) = sorted(peaks.items())
        per_sequence = (p2 - p1) / (b2 - b1)
        result = {
            "impl": "ours, compiled" if args.compile else "ours",
            "case": CASE.name,
            "arm": arm,
            "precision": "float32 (CPU)",
            "peak_rss_gib_by_batch": peaks,
            "per_sequence_gib": per_sequence,
            "estimated_peak_gib_at_batch": {CASE.batch_size: p1 + per_sequence * (CASE.batch_size - b1)},
        }
        line = json.dumps(result)
        print(line, flush=True)
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
