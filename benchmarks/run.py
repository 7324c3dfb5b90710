"""Run the benchmark groups and write BENCHMARKS.md (tables) with PNG plots beside it.

    python -m benchmarks.run                       # every group, full size (make bench)
    python -m benchmarks.run --quick               # smoke-test size, to benchmarks/results/BENCHMARKS-quick.md
    python -m benchmarks.run --groups speed,serving
    python -m benchmarks.run --report-only         # rebuild BENCHMARKS.md from benchmarks/results/*.json

Each group writes benchmarks/results/<group>.json as soon as it finishes, and BENCHMARKS.md is
rebuilt after every group, so a long run that is cut short still reports what it measured.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks import report
from benchmarks.common import RESULTS, machine

GROUPS = (
    "speed",
    "classification",
    "generation",
    "serving",
    "scaling",
    "small_choice",
    "defaults",
    "demo_settings",
    "demo_seeds",
)


def run_group(name: str, quick: bool) -> None:
    flag = ["--quick"] if quick else []
    start = time.perf_counter()
    if name == "serving":
        from benchmarks import serving

        out = RESULTS / ("serving-quick.json" if quick else "serving.json")
        serving.main([*flag, "--out", str(out)])
    else:
        module = __import__(f"benchmarks.{name}", fromlist=["main"])
        module.main(flag)
    timing_path = RESULTS / "timings.json"
    timings = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    timings[name + ("-quick" if quick else "")] = time.perf_counter() - start
    timing_path.write_text(json.dumps(timings, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)}")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "BENCHMARKS-quick.md" if args.quick else Path("BENCHMARKS.md")  # a smoke test keeps the report
    (RESULTS / "machine.json").write_text(json.dumps(machine(), indent=2))
    if not args.report_only:
        for name in args.groups.split(","):
            print(f"== {name}", flush=True)
            run_group(name, args.quick)
            report.write(out, quick=args.quick)
    report.write(out, quick=args.quick)


if __name__ == "__main__":
    main()
