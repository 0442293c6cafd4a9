"""What reshaping costs: the sequential workload (50,000 records, 500 pages) run with
`fields` (five keys, the usual run), with the same `fields` and a two-field `add_fields`,
with a two-field `add_fields` on the whole record, and with the `fields` projection that
gives the same output as that `add_fields`.

    python benchmarks/reshape.py [--rounds 7]

Alternating rounds, whole processes, medians; writes results/reshape.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import (  # noqa: E402 (bench.py is a script beside this one)
    PY,
    ROOT,
    SEQ_RECORDS,
    Contender,
    Server,
    loop_contender,
    rounds_of,
    run_once,
    runner_contender,
)

FLOWS = (
    ("fields (five keys)", "sequential.yaml"),
    ("fields (five keys) + add_fields (two keys)", "sequential_fields_add.yaml"),
    ("add_fields (two keys, record kept)", "sequential_add_fields.yaml"),
    ("fields (the same output as add_fields)", "sequential_whole.yaml"),
)


def median_wall(c: Contender) -> float:
    return statistics.median(s.wall for s in c.samples)


def median_cpu(c: Contender) -> float:
    return statistics.median(s.cpu for s in c.samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    subprocess.run([PY, "-m", "compileall", "-q", str(ROOT / "runner")], check=False)
    server = Server()
    work = Path(tempfile.mkdtemp(prefix="runner-reshape-"))
    try:
        base = server.base(SEQ_RECORDS)
        run_once(loop_contender("warm", "sequential", base, SEQ_RECORDS, True), work / "warm")
        contenders = [runner_contender(name, flow, base, SEQ_RECORDS) for name, flow in FLOWS]
        rounds_of(contenders, args.rounds, work, "reshape")
    finally:
        server.stop()
    failed = [c for c in contenders if c.errors or not c.samples]
    for c in failed:
        print(f"{c.name}: {c.errors[:1]}", file=sys.stderr)
    if failed:
        return 1
    fields, _, added, whole = contenders
    lines = [
        f"### Reshaping: {SEQ_RECORDS:,} records, 500 pages, {args.rounds} alternating rounds",
        "",
        "| run | wall s (median) | CPU s (median) | wall vs fields (five) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for c in contenders:
        ratio = median_wall(c) / median_wall(fields)
        lines.append(f"| {c.name} | {median_wall(c):.2f} | {median_cpu(c):.2f} | {ratio:.3f} |")
    lines += [
        "",
        f"add_fields against the same output written with fields: "
        f"{median_wall(added) / median_wall(whole):.3f} (wall), "
        f"{median_cpu(added) / median_cpu(whole):.3f} (CPU).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "reshape.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
