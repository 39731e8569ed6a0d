"""`python -m sweep.report <sweep folder> [--out DIR|-]`: CSV tables, frontier plots, markdown report.

Reads the trial records (`sweep.results.load_records`, one table: `results_table`) and writes, into
`<sweep_dir>/report/` (or the folder `--out DIR` names): `trials.csv`, `frontier_<arm>.csv`,
`frontier_l0.png`, `frontier_alive.png`, `compute.png`, `verdict.json` and `report.md` (docs/design.md §8;
the "Cost" section and its compute view: `sweep.cost`). `--out -` prints
the markdown report to stdout instead and writes nothing at all (no plots, no CSVs); with
`--out` a finished sweep on read-only storage can still be read. No Ray, no torch; plots use
matplotlib's Agg canvas directly, so importing this module changes no global backend.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sparsify import StorageError, atomic_write_text, atomic_write_with, check_writable, make_folders
from sparsify.metric_names import (
    EVAL_ALIVE,
    EVAL_CE_LOSS_INCREASE,
    EVAL_L0,
    TOKENS_SEEN,
    TRAIN,
    prefixed,
    se_name,
)
from sweep import cost
from sweep.baseline import baseline_arm
from sweep.bootstrap import points_from_records
from sweep.pareto import frontiers, hypervolume_2d, l0_ratio_at_matched_ce, shared_reference_point
from sweep.records import FINISHED, STATUSES, TRIALS_DIR, SweepDir
from sweep.results import PARAM_PREFIX, finished, load_records, results_table
from sweep.space import SPACE_RECORD
from sweep.storage import SweepStore, as_store, child_uri
from sweep.verdict import METHOD, Comparison, compare

logger = logging.getLogger(__name__)

REPORT_DIR = "report"
"""The report's default folder, inside the sweep folder."""
STDOUT = "-"
"""`--out -`: print the markdown report, write nothing."""
TRAIN_TOKENS = prefixed(TRAIN, TOKENS_SEEN)
TOY_SCALE_TOKENS = 10_000_000
"""Below this many training tokens per SAE a sweep is a toy-scale run: the paper trains on
400k sequences of 1,024 tokens (~410M tokens)."""
CE_LABEL = "eval CE loss increase (nats/token)"
VIEWS = {
    # file stem -> (x column, x-axis label)
    "frontier_l0": (EVAL_L0, "eval L0 (active dictionary elements per token)"),
    "frontier_alive": (EVAL_ALIVE, "eval alive dictionary elements"),
}


class ReportError(Exception):
    """A report cannot be built from the given folder (missing, or no trial records)."""


def _write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    atomic_write_with(path, lambda tmp: df.to_csv(tmp, index=False))


def _cell(value: object) -> str:
    """One markdown table cell: 4 significant digits for floats, "n/a" for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame, headers: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table of `df` (no index), without `tabulate`.

    Args:
        df: The rows to show.
        headers: Column titles; by default the column names.

    Returns:
        The table as lines ending in a newline.
    """
    headers = list(df.columns) if headers is None else list(headers)
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _plot_view(
    path: Path,
    trials: pd.DataFrame,
    fronts: Mapping[str, pd.DataFrame],
    arms: Sequence[str],
    x: str,
    x_label: str,
) -> None:
    """One frontier plot: finished trials faint, each arm's frontier as a line (docs/design.md §8)."""
    fig = Figure(figsize=(7, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    any_positive_x = False
    for i, arm in enumerate(arms):
        color = f"C{i % 10}"
        points = trials[trials["arm"] == arm]
        ax.scatter(points[x], points[EVAL_CE_LOSS_INCREASE], color=color, alpha=0.3, s=24, linewidths=0)
        x_err, y_err = _errors(points, x), _errors(points, EVAL_CE_LOSS_INCREASE)
        if x_err is not None or y_err is not None:
            # one standard error: of the eval mean, or across a point's seeds (`seeds: N`)
            ax.errorbar(points[x], points[EVAL_CE_LOSS_INCREASE], xerr=x_err, yerr=y_err, fmt="none",
                        ecolor=color, alpha=0.5, elinewidth=1, capsize=2)  # fmt: skip
        front = fronts.get(arm, points.iloc[0:0])
        ax.plot(front[x], front[EVAL_CE_LOSS_INCREASE], color=color, marker="o", label=f"{arm} frontier")
        any_positive_x |= bool((pd.to_numeric(points[x], errors="coerce") > 0).any())
    if any_positive_x:
        ax.set_xscale("log")
        # plain numbers (8, 20, 30) read better than 2x10^1 on a short log axis
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel(x_label)
    ax.set_ylabel(CE_LABEL)
    ax.grid(True, alpha=0.3)
    if arms:
        ax.legend()
    # fixed margins: tight_layout would draw the figure twice
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.11, top=0.97)
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def _errors(points: pd.DataFrame, column: str) -> Any:
    """The standard errors of a column (`eval_se/...`) for error bars, or None when not recorded."""
    se = se_name(column)
    if se not in points.columns:
        return None
    values = pd.to_numeric(points[se], errors="coerce").fillna(0.0).to_numpy(dtype=float)
    return values if values.any() else None


def _counts_table(df: pd.DataFrame) -> pd.DataFrame:
    counts = pd.crosstab(df["arm"], df["status"]).reindex(columns=list(STATUSES), fill_value=0)
    counts["total"] = df.groupby("arm").size()
    return counts.reset_index()


def _frontier_section(arm: str, front: pd.DataFrame) -> str:
    columns = ["trial_id", EVAL_L0, EVAL_ALIVE, EVAL_CE_LOSS_INCREASE]
    params = [c for c in front.columns if c.startswith(PARAM_PREFIX)]
    headers = ["trial_id", "L0", "alive", "CE increase (nats/token)"] + params
    if front.empty:
        return f"### {arm}\n\nNo finished trial.\n"
    return f"### {arm}\n\n" + markdown_table(front[columns + params], headers)


def _ratio_section(fronts: Mapping[str, pd.DataFrame], baseline: str | None) -> str:
    title = "## L0 ratio to the baseline at matched CE loss increase\n\n"
    if baseline is None:
        return title + "No baseline arm (see the verdict).\n"
    intro = (
        f"L0 of the baseline ({baseline}) / L0 of each arm at CE-loss increases spread over the overlap of "
        "their frontiers, interpolated linearly in log L0 (docs/design.md §8).\n\n"
    )
    tables = []
    for arm in sorted(fronts):
        if arm == baseline:
            continue
        if baseline not in fronts:
            tables.append(f"### {arm}\n\n{baseline} has no finished trial.\n")
            continue
        ratios = l0_ratio_at_matched_ce(fronts, baseline, arm)
        if ratios.empty:
            tables.append(f"### {arm}\n\nThe two frontiers' CE loss increase ranges do not overlap.\n")
            continue
        headers = ["CE increase (nats/token)", f"L0 {baseline}", f"L0 {arm}", f"ratio {baseline}/{arm}"]
        tables.append(f"### {arm}\n\n" + markdown_table(ratios, headers))
    return title + intro + "\n".join(tables)


def _hypervolume_section(trials: pd.DataFrame, arms: Sequence[str]) -> str:
    lines = [
        "## Hypervolume\n\n",
        "Area dominated by each arm's frontier, minimizing both axes, against one "
        "reference point shared by all arms: 1.1 x the maximum over all finished trials on each axis.\n\n",
    ]
    by_arm = {arm: trials[trials["arm"] == arm] for arm in arms}
    table = pd.DataFrame({"arm": list(arms)})
    for x, _ in VIEWS.values():
        try:
            ref = shared_reference_point(by_arm, x, EVAL_CE_LOSS_INCREASE)
        except ValueError:
            lines.append(f"- {x} view: no finished trial has both values.\n")
            continue
        lines.append(f"- {x} view: reference point ({x} = {ref[0]:.4g}, CE increase = {ref[1]:.4g})\n")
        table[f"hypervolume, {x} view"] = [
            hypervolume_2d(by_arm[arm], x, EVAL_CE_LOSS_INCREASE, ref) for arm in arms
        ]
    return "".join(lines) + "\n" + markdown_table(table)


@dataclass(frozen=True)
class _Results:
    """A sweep's results table, its frontiers and its verdict, as the report shows them."""

    df: pd.DataFrame
    arms: list[str]
    done: pd.DataFrame
    fronts: dict[str, pd.DataFrame]
    alive_done: pd.DataFrame
    alive_fronts: dict[str, pd.DataFrame]
    baseline: str | None
    baseline_note: str
    """Why there is no baseline, or where it came from."""
    comparisons: list[Comparison]
    costs: cost.CostView = field(default_factory=cost.CostView)
    """What each trial and arm cost, and the compute view (`sweep.cost`)."""


def recorded_baseline(sweep_dir: SweepDir) -> tuple[str | None, str]:
    """The baseline arm of the search space recorded in the sweep folder (`SPACE_RECORD`), and
    a note saying where it came from or why there is none."""
    store = as_store(sweep_dir)
    path = store.local / SPACE_RECORD
    try:
        store.pull(SPACE_RECORD)
        space = json.loads(path.read_text(encoding="utf-8"))["space"]
        arms = space["arms"]
        losses = {name: arm.get("loss") or {} for name, arm in arms.items()}
        searched = {name: list(arm.get("search") or {}) for name, arm in arms.items()}
        fixed = {name: dict(arm.get("set") or {}) for name, arm in arms.items()}
        fine_tunes = [name for name, arm in arms.items() if arm.get("init_from")]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, f"no readable {SPACE_RECORD} in the sweep folder; name the baseline with --baseline ARM"
    try:
        baseline = baseline_arm(losses, searched, space.get("baseline"), fixed, fine_tunes)
    except ValueError as exc:
        return None, f"{exc} (or --baseline ARM)"
    if baseline is None:
        return None, "the search space has one arm: there is nothing to compare"
    how = "named by `baseline`" if space.get("baseline") else "the arm without logits_kl and in_to_orig terms"
    return baseline, how


def _load(sweep_dir: SweepStore, baseline: str | None = None) -> _Results:
    """Read a sweep's trial records (nothing is written) and compare every arm with the baseline.

    Raises:
        ReportError: If the folder does not exist or holds no readable trial record, or
            `baseline` is not one of its arms.
    """
    if not sweep_dir.exists():
        raise ReportError(f"sweep folder not found: {sweep_dir}")
    records = load_records(sweep_dir)  # read once: the table and the verdict's points
    df = results_table(records)
    if df.empty:
        raise ReportError(f"no trial records under {child_uri(sweep_dir.uri, TRIALS_DIR)}")
    for column in (EVAL_L0, EVAL_ALIVE, EVAL_CE_LOSS_INCREASE):
        if column not in df.columns:
            df[column] = float("nan")
    arms = sorted(df["arm"].unique())
    if baseline is not None:
        if baseline not in arms:
            raise ReportError(
                f"--baseline {baseline!r} is not an arm of this sweep (arms: {', '.join(arms)})"
            )
        note = "named with --baseline"
    else:
        baseline, note = recorded_baseline(sweep_dir)
    points = points_from_records(records)
    comparisons = []
    if baseline is not None:
        comparisons = [
            compare(arm, baseline, points.get(arm, []), points.get(baseline, []))
            for arm in arms
            if arm != baseline
        ]
    done = finished(df)
    fronts = frontiers(done, EVAL_L0, EVAL_CE_LOSS_INCREASE)
    alive_done = finished(df, (EVAL_ALIVE, EVAL_CE_LOSS_INCREASE))
    return _Results(
        df=df,
        arms=arms,
        done=done,
        fronts=fronts,
        alive_done=alive_done,
        alive_fronts=frontiers(alive_done, EVAL_ALIVE, EVAL_CE_LOSS_INCREASE),
        baseline=baseline,
        baseline_note=note,
        comparisons=comparisons,
        costs=cost.CostView.of(records, done, fronts, arms),
    )


def _max_train_tokens(done: pd.DataFrame) -> float | None:
    """The most training tokens any finished trial's SAEs saw, or None when not recorded."""
    if TRAIN_TOKENS not in done.columns or done.empty:
        return None
    tokens = float(pd.to_numeric(done[TRAIN_TOKENS], errors="coerce").max())
    return tokens if math.isfinite(tokens) and tokens > 0 else None


def _toy_scale_note(done: pd.DataFrame) -> str:
    """A plain warning when the SAEs trained on too few tokens for the verdict to mean much."""
    tokens = _max_train_tokens(done)
    if tokens is None or tokens >= TOY_SCALE_TOKENS:
        return ""
    ce = pd.to_numeric(done[EVAL_CE_LOSS_INCREASE], errors="coerce")
    return (
        f"**Toy-scale run.** Each SAE trained on at most {tokens:,.0f} tokens (the paper: ~410M); these "
        f"SAEs are far from converged, and their CE-loss increases ({ce.min():.3g}-{ce.max():.3g} "
        "nats/token) are far above the paper's 0.1-0.2. Read this verdict as a demonstration of the "
        "method, not as an answer: `search_spaces/e2e_gpt2.yaml` runs the real comparison (GPT-2 small, "
        "L0 targets 20-200).\n\n"
    )


def _verdict_section(results: _Results) -> str:
    lines = ["## Verdict\n\n", _toy_scale_note(results.done)]
    if results.baseline is None:
        return "".join(lines) + f"No verdict: {results.baseline_note}.\n"
    lines.append(f"Baseline: **{results.baseline}** ({results.baseline_note}).\n\n")
    lines += [comparison.text + "\n\n" for comparison in results.comparisons]
    lines.append(f"Method: {METHOD}\n")
    return "".join(lines)


def verdict_json(results: _Results) -> dict[str, Any]:
    """The verdict's numbers, as written to `verdict.json`."""
    tokens = _max_train_tokens(results.done)
    return {
        "baseline": results.baseline,
        "baseline_note": results.baseline_note,
        "toy_scale": tokens is not None and tokens < TOY_SCALE_TOKENS,
        "max_train_tokens_per_sae": tokens,
        "method": METHOD,
        "comparisons": [c.to_json() for c in results.comparisons],
        "cost": results.costs.to_json(),
    }


def _finite_or_null(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None: strict JSON (jq, JavaScript)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(v) for v in value]
    return value


NO_PLOT = "(No plot in a printed report: `python -m sweep.report <sweep folder> --out DIR` draws it.)\n"


def _markdown(sweep_dir: SweepStore, results: _Results, plots: bool) -> str:
    """The markdown report; `plots`: it sits beside the PNGs (else it says where to get them)."""
    df, arms, fronts = results.df, results.arms, results.fronts
    name = sweep_dir.name
    sections = [
        f"# Sweep report: {name}\n\n{len(df)} trials in `{sweep_dir}`; frontiers use finished trials only.\n",
        _verdict_section(results),
        "## Trials per arm\n\n" + markdown_table(_counts_table(df)),
        "## Frontiers: L0 vs CE loss increase\n\n"
        + ("![L0 vs CE loss increase](frontier_l0.png)\n" if plots else NO_PLOT),
        *(_frontier_section(arm, fronts.get(arm, df.iloc[0:0])) for arm in arms),
        "## Alive dictionary elements vs CE loss increase\n\n"
        + ("![alive elements vs CE loss increase](frontier_alive.png)\n" if plots else NO_PLOT),
        _ratio_section(fronts, results.baseline),
        # each view keeps its own finite points (hypervolume_2d drops NaN per view)
        _hypervolume_section(df[df["status"] == FINISHED], arms),
        results.costs.section(markdown_table, plots, NO_PLOT),
    ]
    return "\n".join(sections)


def report_text(sweep_dir: SweepDir, baseline: str | None = None) -> str:
    """The markdown report of a sweep, without plots, writing nothing (e.g. for a sweep on
    read-only storage).

    Raises:
        ReportError: If the folder does not exist or holds no readable trial record, or
            `baseline` is not an arm.
    """
    store = as_store(sweep_dir)
    return _markdown(store, _load(store, baseline), plots=False)


def build_report(
    sweep_dir: SweepDir,
    out_dir: str | os.PathLike[str] | None = None,
    baseline: str | None = None,
) -> Path:
    """Write the CSVs, plots, `verdict.json` and markdown report of a sweep (docs/design.md §8).

    Args:
        sweep_dir: The sweep's folder or `SweepStore` (holding `trials/<arm>/<trial_id>.json`);
            only read.
        out_dir: Where to write the report (created if missing); by default
            `<sweep_dir>/report` (on object storage: written in the local mirror, then uploaded).
        baseline: The arm the verdict compares every other arm with; by default the recorded
            search space's (`SearchSpace.baseline_arm`).

    Returns:
        The path of `<out_dir>/report.md`.

    Raises:
        ReportError: If the folder does not exist or holds no readable trial record.
        StorageError: If the report folder cannot be written (read-only, full, ...): checked
            before anything is written; `filename` is the folder, or the file that failed.
    """
    store = as_store(sweep_dir)
    results = _load(store, baseline)
    out = store.local / REPORT_DIR if out_dir is None else Path(out_dir)
    make_folders(out)
    check_writable(out)
    _write_csv(out / "trials.csv", results.df)
    for arm in results.arms:
        _write_csv(out / f"frontier_{arm}.csv", results.fronts.get(arm, results.df.iloc[0:0]))
    _plot_view(out / "frontier_l0.png", results.done, results.fronts, results.arms, *VIEWS["frontier_l0"])
    _plot_view(
        out / "frontier_alive.png",
        results.alive_done,
        results.alive_fronts,
        results.arms,
        *VIEWS["frontier_alive"],
    )
    results.costs.plot(out / cost.COMPUTE_PLOT)
    _write_text(
        out / "verdict.json",
        json.dumps(_finite_or_null(verdict_json(results)), indent=2, allow_nan=False) + "\n",
    )
    report_path = out / "report.md"
    _write_text(report_path, _markdown(store, results, plots=True))
    if out_dir is None:
        store.push_tree(REPORT_DIR)
    logger.info("wrote report %s", report_path)
    return report_path


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m sweep.report <sweep folder> [--out DIR | --out -]`: build the report and print
    its path, or (`--out -`) print the report itself.

    Args:
        argv: Command-line arguments (default: `sys.argv[1:]`).

    Returns:
        0 on success; 2 after printing a one-line `error: ...` to stderr.
    """
    parser = argparse.ArgumentParser(
        prog="python -m sweep.report", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument(
        "sweep_dir", help="the sweep's folder (holding trials/), or its URI (s3://...); only read"
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help=f"write the report into DIR instead of <sweep_dir>/{REPORT_DIR} (e.g. when the sweep is on "
        f"read-only storage); '{STDOUT}' prints the markdown report to stdout and writes nothing",
    )
    parser.add_argument(
        "--baseline",
        metavar="ARM",
        help="the arm the verdict compares the others with (default: the search space's)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    out = as_store(args.sweep_dir).local / REPORT_DIR if args.out is None else Path(args.out)
    try:
        if args.out == STDOUT:
            sys.stdout.write(report_text(args.sweep_dir, args.baseline))
            return 0
        report_path = build_report(args.sweep_dir, out, args.baseline)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # StorageError included
        if exc.filename == str(out):
            message = f"{out} is not writable ({exc.strerror})"
        else:
            message = f"cannot write {exc.filename}: {exc.strerror}" if exc.filename else str(exc)
        if args.out is None and isinstance(exc, StorageError):
            message += f"; write the report elsewhere with --out DIR, or print it with --out {STDOUT}"
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(report_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
