"""Where a sweep trial's wall time goes: `python -m bench.trial_time [space.yaml]`.

Runs `--num-samples` trials (default 1) of each arm of a search space (default the quickstart)
through the sweep's own Ray Tune + Ray Train path, in a fresh sweep folder, then prints one
column per arm: seconds per trial (the mean over the arm's finished trials) in each phase.

- `Tune, beyond the trial function`: the arm's `Tuner.fit()` wall time minus its trials'
  `wall_time_s`, per trial: Tune's start and end, the trial actor's start and imports, the
  searcher, the record written after the trial function's clock stopped.
- The trial function's own clock (`wall_time_s`), split by the record's `time/` metrics:
  `time/fit_start_s` (Train controller, worker group, the worker's imports; of which
  `time/worker_process_s` passed inside the worker process before its function started), then the
  worker function (`time/worker_fn_s`): `train`'s phases (`time/model_load_s`, `time/data_s`,
  `time/train_steps_s`, `time/eval_s`, `time/alive_s`, `time/save_s`) and the rest of it (the final
  save, tracker, config); `time/fit_end_s` (Train's teardown), and the trial function's own work
  around the fit.
- `fixed cost`: everything but the training steps and the evals (with their alive counts) the config asks for.

The sweep folder is temporary unless `--sweep-dir` is given; the model, token and activation
caches (`$SPARSIFY_CACHE`) are the usual ones, so a first run on a machine pays their building
once (run it twice). Timings on a shared machine are noisy: compare several runs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sparsify import metric_names as names

DEFAULT_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"
TUNE_OVERHEAD = "tune_beyond_trial_fn_s"
TRIAL_WALL = "trial_fn_wall_s"
TOTAL = "total_per_trial_s"
WORKER_OTHER = "worker_fn_other_s"
TRIAL_OTHER = "trial_fn_other_s"
FIXED = "fixed_cost_s"
ROWS = (
    (TOTAL, "total per trial (arm fit / trials)"),
    (TUNE_OVERHEAD, "Tune, beyond the trial function"),
    (TRIAL_WALL, "trial function (record's wall_time_s)"),
    (names.TIME_FIT_START_S, "  fit() start -> worker fn"),
    (names.TIME_WORKER_PROCESS_S, "    of which worker process start -> fn"),
    (names.TIME_WORKER_FN_S, "  worker fn"),
    (names.TIME_MODEL_LOAD_S, "    model load (+ its imports)"),
    (names.TIME_DATA_S, "    data checks, stream, act. cache"),
    (names.TIME_TRAIN_STEPS_S, "    training steps"),
    (names.TIME_EVAL_S, "    eval"),
    (names.TIME_ALIVE_S, "    alive counting"),
    (names.TIME_SAVE_S, "    checkpoints"),
    (WORKER_OTHER, "    rest (final save, setup)"),
    (names.TIME_FIT_END_S, "  worker return -> fit() return"),
    (TRIAL_OTHER, "  trial fn, around the fit"),
    (FIXED, "fixed cost (total - steps - eval - alive)"),
)


def trial_breakdown(metrics: dict[str, float], wall_time_s: float) -> dict[str, float]:
    """One finished trial's phases (seconds, `ROWS` keys but the arm-level ones) from its record."""
    row = {
        name: float(metrics.get(name, math.nan)) for name in (*names.TIME_METRICS, *names.FIT_TIME_METRICS)
    }
    row[TRIAL_WALL] = wall_time_s
    row[WORKER_OTHER] = row[names.TIME_WORKER_FN_S] - sum(row[name] for name in names.TIME_METRICS)
    fit = row[names.TIME_FIT_START_S] + row[names.TIME_WORKER_FN_S] + row[names.TIME_FIT_END_S]
    row[TRIAL_OTHER] = wall_time_s - fit
    return row


def arm_breakdown(trials: list[dict[str, float]], fit_wall_s: float) -> dict[str, float]:
    """The mean of the trials' phases, with the arm's `Tuner.fit()` wall time shared out."""
    row = {key: statistics.fmean(trial[key] for trial in trials) for key in trials[0]}
    row[TOTAL] = fit_wall_s / len(trials)
    row[TUNE_OVERHEAD] = row[TOTAL] - row[TRIAL_WALL]
    asked = row[names.TIME_TRAIN_STEPS_S] + row[names.TIME_EVAL_S] + row[names.TIME_ALIVE_S]
    row[FIXED] = row[TOTAL] - asked
    return row


def table(columns: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per phase (`ROWS`), one column per arm."""
    arms = list(columns)
    lines = ["| phase (s per trial) | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]
    for key, label in ROWS:
        cells = [f"{columns[arm].get(key, math.nan):.1f}" for arm in arms]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(space_path: Path, arms: list[str] | None, num_samples: int, sweep_root: Path) -> dict[str, Any]:
    """Run the trials and return `{"ray_start_s", "arms": {arm: breakdown}, "trials": [...]}`."""
    from sweep.results import load_records
    from sweep.run import start_ray, sweep_folder
    from sweep.space import load_search_space

    loaded = load_search_space(space_path)
    chosen = arms or [a for a, arm in loaded.space.arms.items() if arm.init_from is None]
    for arm in chosen:
        if arm not in loaded.space.arms or loaded.space.arms[arm].init_from is not None:
            raise SystemExit(f"error: --arms: {arm!r} is not an arm of {space_path} without init_from")
    sweep_dir = sweep_folder(str(sweep_root), loaded.space.name)
    start = time.perf_counter()
    start_ray()
    ray_start_s = time.perf_counter() - start
    from sweep.tuner import arm_tuner  # imports Ray: after start_ray set its environment

    fit_wall: dict[str, float] = {}
    for arm in chosen:
        print(f"=== arm {arm}: {num_samples} trial(s) ===", flush=True)
        tuner = arm_tuner(loaded, arm, sweep_dir, num_samples)
        start = time.perf_counter()
        tuner.fit()
        fit_wall[arm] = time.perf_counter() - start
    records = [r for r in load_records(sweep_dir) if r.arm in fit_wall]
    trials = [
        {"arm": r.arm, "trial_id": r.trial_id, **trial_breakdown(r.metrics, r.wall_time_s or math.nan)}
        for r in records
        if r.status == "finished"
    ]
    columns = {}
    for arm in chosen:
        own = [
            {k: v for k, v in t.items() if k not in ("arm", "trial_id")} for t in trials if t["arm"] == arm
        ]
        if own:
            columns[arm] = arm_breakdown(own, fit_wall[arm])
        else:
            print(f"arm {arm}: no finished trial", file=sys.stderr)
    return {"ray_start_s": ray_start_s, "arms": columns, "trials": trials, "fit_wall_s": fit_wall}


def from_sweep(sweep_dir: str) -> dict[str, Any]:
    """The breakdown of a sweep that already ran (a folder or an `s3://` URI), from its records
    alone: Tune's own time per trial is not recorded there (NaN), so the total is the trial's."""
    from sweep.results import load_records

    columns = {}
    records = [r for r in load_records(sweep_dir) if r.status == "finished" and r.init_from is None]
    for arm in sorted({r.arm for r in records}):
        own = [trial_breakdown(r.metrics, r.wall_time_s or math.nan) for r in records if r.arm == arm]
        columns[arm] = arm_breakdown(own, math.nan)
        columns[arm][TOTAL] = columns[arm][TRIAL_WALL]
        columns[arm][FIXED] = columns[arm][TOTAL] - sum(
            columns[arm][name] for name in (names.TIME_TRAIN_STEPS_S, names.TIME_EVAL_S, names.TIME_ALIVE_S)
        )
    return {"arms": columns}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Where a sweep trial's wall time goes, per arm.")
    parser.add_argument("space", nargs="?", type=Path, default=DEFAULT_SPACE, help="search-space file")
    parser.add_argument("--arms", help="comma-separated arms to run (default: every arm without init_from)")
    parser.add_argument("--num-samples", type=int, default=1, help="trials per arm (default 1)")
    parser.add_argument("--sweep-dir", type=Path, help="parent folder of the sweep (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    parser.add_argument(
        "--from-sweep",
        metavar="SWEEP",
        help="print the breakdown of a sweep that already ran (its folder or URI) instead of running trials",
    )
    args = parser.parse_args(argv)
    if args.from_sweep:
        print(table(from_sweep(args.from_sweep)["arms"]))
        return 0
    arms = args.arms.split(",") if args.arms else None
    with tempfile.TemporaryDirectory(prefix="trial_time-") as tmp:
        result = run(args.space, arms, args.num_samples, args.sweep_dir or Path(tmp))
    print(f"\nRay start (once per sweep): {result['ray_start_s']:.1f} s\n")
    print(table(result["arms"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
