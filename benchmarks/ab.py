"""Two checkouts of the runner against each other and the hand-written loop, alternating.

    .venv/bin/python benchmarks/ab.py BEFORE_DIR AFTER_DIR   # ROUNDS=9 ONLY=sequential,fanout

Each checkout's `runner/` runs with this venv's interpreter, through a launcher that puts
the checkout first on `sys.path` (`python -m` would import the one in the working folder
whatever PYTHONPATH says), compiled first;
in every round the two runners and the loop run one after the other, so that a loaded
machine weighs on all three alike. Prints medians and ratios to the loop (and, for
`runner validate`, to the first checkout).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import (  # noqa: E402
    Contender,
    Server,
    count_lines,
    loop_contender,
    rounds_of,
    run_once,
    summarize,
    table,
)

PY = sys.executable


LAUNCHER = """import sys
sys.path.insert(0, {src!r})
import runner.cli
assert runner.cli.__file__.startswith({src!r}), runner.cli.__file__
sys.exit(runner.cli.main())
"""


def launcher(src: str, folder: Path) -> str:
    path = folder / f"launch-{abs(hash(src))}.py"
    path.write_text(LAUNCHER.format(src=src), encoding="utf-8")
    return str(path)


def runner_at(label: str, launch: str, flow: str, base: str, expected: int) -> Contender:
    def make(work: Path) -> tuple[list[str], Path | None, Callable[[], int]]:
        out = work / "out"
        flow_path = str(HERE / "flows" / flow)
        argv = [PY, launch, "run", flow_path, "--output-dir", str(out)]
        return argv, None, lambda: count_lines(out / "items.jsonl")

    return Contender(f"runner {label}", make, expected, env={"BENCH_URL": base})


def validate_at(label: str, launch: str) -> Contender:
    flow = str(HERE / "flows" / "sequential.yaml")

    def make(work: Path) -> tuple[list[str], Path | None, Callable[[], int]]:
        return [PY, launch, "validate", flow], None, lambda: 0

    return Contender(f"validate {label}", make, 0)


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    sources = {"before": os.path.abspath(sys.argv[1]), "after": os.path.abspath(sys.argv[2])}
    rounds = int(os.environ.get("ROUNDS", "7"))
    only = os.environ.get("ONLY", "sequential,fanout,startup").split(",")
    for src in sources.values():
        subprocess.run([PY, "-m", "compileall", "-q", f"{src}/runner"], check=False)
    server = Server()
    work = Path(tempfile.mkdtemp(prefix="runner-ab-"))
    checkouts = {label: launcher(src, work) for label, src in sources.items()}
    out = []
    try:
        seq_base, fan_base = server.base(50_000), server.base(3_000)
        for warm in (
            loop_contender("warm", "sequential", seq_base, 50_000, True),
            loop_contender("warm", "fanout", fan_base, 3_000, True),
        ):
            run_once(warm, work / "warm")
        if "sequential" in only:
            seq = [
                runner_at(k, v, "sequential.yaml", seq_base, 50_000) for k, v in checkouts.items()
            ]
            seq.append(loop_contender("aiohttp loop", "sequential", seq_base, 50_000, False))
            rounds_of(seq, rounds, work, "sequential")
            out.append(table("Sequential", summarize(seq, "aiohttp loop"), "loop"))
        if "fanout" in only:
            fan = [runner_at(k, v, "fanout.yaml", fan_base, 3_000) for k, v in checkouts.items()]
            fan.append(loop_contender("gather + semaphore", "fanout", fan_base, 3_000, False))
            rounds_of(fan, rounds, work, "fanout")
            out.append(table("Fan-out", summarize(fan, "gather + semaphore"), "gather"))
        if "startup" in only:
            start = [validate_at(k, v) for k, v in checkouts.items()]
            rounds_of(start, rounds * 3, work, "startup")
            out.append(table("Start-up", summarize(start, "validate before"), "before"))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(out))
    print(f"load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
