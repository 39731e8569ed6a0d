"""Side-by-side step benchmark: ours and the reference `e2e-sae` 2.1.1, same case, same run.

    python -m bench.run --case smollm2-cpu --ref-python .venv-ref/bin/python
    python -m bench.run --case gpt2-small-gpu --precision float32 bf16-autocast --steps 10

Each implementation runs in its own process (the reference in its own venv, since it needs
transformer-lens < 4); both append JSON lines to `--out`, then this prints a table with
tokens/s, ours/reference ratios per arm and, on GPU, MFU and peak memory. Without a reference
venv it times ours alone and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.cases import ARMS, CASES

DEFAULT_REF_PYTHON = Path(".venv-ref/bin/python")
OUR_VARIANTS = ("ours", "ours, compiled")


def run_impl(
    module: str, python: str, pythonpath: str | None, args: list[str], out: Path, timeout: float
) -> int:
    """Run `python -m module args --out out` with the repo root (after `pythonpath`, if given)
    on the import path; returns its exit code (124 when it ran past `timeout` seconds)."""
    command = [python, "-m", module, *args, "--out", str(out)]
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, root) if p)}
    print("$", f"PYTHONPATH={env['PYTHONPATH']}", " ".join(command), flush=True)
    try:
        return subprocess.call(command, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{module} ran past {timeout:.0f} s; its finished cases are kept", flush=True)
        return 124


def comparison(results: list[dict]) -> list[dict]:
    """Per (our variant, arm, precision): ours/reference tokens/s, and local/e2e within the same
    variant and precision. Our variants: `ours` (eager) and `ours, compiled`."""
    reference = {r["arm"]: r for r in results if r["impl"].startswith("reference")}
    ours = [r for r in results if r["impl"] in OUR_VARIANTS]
    rows = []
    for r in ours:
        row = {
            "impl": r["impl"],
            "arm": r["arm"],
            "precision": r["precision"],
            "ours_tokens_per_s": r["tokens_per_s"],
        }
        ref = reference.get(r["arm"])
        if ref is not None:
            row["reference_tokens_per_s"] = ref["tokens_per_s"]
            row["ours_over_reference"] = r["tokens_per_s"] / ref["tokens_per_s"]
        e2e = next(
            (o for o in ours if (o["impl"], o["arm"], o["precision"]) == (r["impl"], "e2e", r["precision"])),
            None,
        )
        if r["arm"] == "local" and e2e is not None:
            row["local_over_e2e"] = r["tokens_per_s"] / e2e["tokens_per_s"]
        rows.append(row)
    return rows


def print_table(results: list[dict], rows: list[dict]) -> None:
    print(f"\n{'impl':<26}{'arm':<8}{'precision':<15}{'step s':>9}{'tok/s':>11}{'MFU':>7}{'peak GiB':>10}")
    for r in results:
        mfu = f"{r['mfu_vs_bf16_peak']:.1%}" if "mfu_vs_bf16_peak" in r else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "-"
        print(
            f"{r['impl']:<26}{r['arm']:<8}{r['precision']:<15}{r['step_s']:>9.3f}"
            f"{r['tokens_per_s']:>11.0f}{mfu:>7}{mem:>10}"
        )
    print(f"\n{'ours':<16}{'arm':<8}{'precision':<15}{'ours/reference':>15}{'local/e2e':>11}")
    for row in rows:
        ratio = f"{row['ours_over_reference']:.2f}x" if "ours_over_reference" in row else "-"
        local = f"{row['local_over_e2e']:.2f}x" if "local_over_e2e" in row else ""
        print(f"{row['impl']:<16}{row['arm']:<8}{row['precision']:<15}{ratio:>15}{local:>11}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), required=True)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--precision", nargs="+", default=["float32"], help="ours: float32, bf16-autocast")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ref-python", default=os.environ.get("REF_PYTHON", str(DEFAULT_REF_PYTHON)))
    parser.add_argument(
        "--ours-pythonpath", help="folder of our dependencies (a pip --target install), put before the repo"
    )
    parser.add_argument(
        "--ref-pythonpath",
        help="the reference's dependencies as a pip --target folder; it then runs with this Python",
    )
    parser.add_argument(
        "--compile-precision",
        nargs="+",
        default=[],
        help="also time ours with torch.compile'd SAEs and loss terms, at these precisions",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per implementation")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    jsonl = args.out / f"{args.case}.jsonl"
    jsonl.unlink(missing_ok=True)
    common = [
        "--case",
        args.case,
        "--arms",
        *args.arms,
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
    ]
    ours_args = [*common, "--precision", *args.precision]
    codes = {
        "ours": run_impl("bench.ours", sys.executable, args.ours_pythonpath, ours_args, jsonl, args.timeout)
    }
    if args.compile_precision:
        compiled_args = [*common, "--precision", *args.compile_precision, "--compile"]
        codes["ours, compiled"] = run_impl(
            "bench.ours", sys.executable, args.ours_pythonpath, compiled_args, jsonl, args.timeout
        )
    if args.ref_pythonpath:
        codes["reference"] = run_impl(
            "bench.reference", sys.executable, args.ref_pythonpath, common, jsonl, args.timeout
        )
    elif Path(args.ref_python).exists():
        codes["reference"] = run_impl("bench.reference", args.ref_python, None, common, jsonl, args.timeout)
    else:
        print(
            f"no reference venv at {args.ref_python}: timing ours alone (bench/README.md says how to make one)"
        )
    results = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    rows = comparison(results)
    with jsonl.open("a") as f:
        for row in rows:
            f.write(json.dumps({"impl": "comparison", "case": args.case, **row}) + "\n")
    print_table(results, rows)
    print(f"\nJSON lines: {jsonl}")
    return 0 if all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
