"""Compare the logged training records of two sets of short runs (before / after a change).
usage: python bitcompare.py BEFORE_DIR AFTER_DIR  -> one line per run: identical, or the largest
relative difference of the loss / any logged term common to both (timings excluded)."""
import json, sys
from pathlib import Path

SKIP = ("sec_per_step", "data_sec_per_step", "lr")


def records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]


before, after = Path(sys.argv[1]), Path(sys.argv[2])
for run in sorted(p for p in before.iterdir() if p.is_dir()):
    other = after / run.name
    if not (other / "metrics.jsonl").exists():
        print(f"{run.name:18s} missing in {after}")
        continue
    a, b = records(run), records(other)
    worst, where, compared, first = 0.0, None, 0, None
    for ra, rb in zip(a, b):
        for key in ra:
            if key in SKIP or key not in rb or not isinstance(ra[key], (int, float)):
                continue
            compared += 1
            diff = abs(ra[key] - rb[key]) / max(abs(ra[key]), 1e-30)
            if diff > 0 and first is None:
                first = (ra["step"], key)
            if diff > worst:
                worst, where = diff, (ra["step"], key)
    steps = [r["step"] for r in a]
    if worst == 0:
        verdict = "IDENTICAL (bit-for-bit)" if len(a) == len(b) else f"record counts differ: {len(a)} vs {len(b)}"
    else:
        verdict = f"max rel diff {worst:.2e} at step {where[0]} ({where[1]}); first differs at step {first[0]} ({first[1]})"
    print(f"{run.name:18s} {len(a)} records (steps {steps[0]}-{steps[-1]}), {compared} values: {verdict}")
