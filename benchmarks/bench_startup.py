"""Interpreter start-up time with `foam-hf autoregister` off and on, in a fresh virtual environment.

    python benchmarks/bench_startup.py [--runs 20]

Creates a throw-away venv that sees this environment's packages, then times `python -c pass` with the hook
off and on, interleaved, and prints the medians and what `-X importtime` attributes to foam_hf.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        python = str(venv / "bin" / "python")
        purelib = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        ours = sysconfig.get_paths()["purelib"]
        (Path(purelib) / "00-parent-env.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
        times: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(args.runs):
            for state in ("off", "on"):
                subprocess.run([python, "-m", "foam_hf", "autoregister", state], check=True, capture_output=True)
                start = time.perf_counter()
                subprocess.run([python, "-c", "pass"], check=True)
                times[state].append(time.perf_counter() - start)
        trace = subprocess.run([python, "-X", "importtime", "-c", "pass"], capture_output=True, text=True).stderr
        subprocess.run([python, "-m", "foam_hf", "autoregister", "off"], check=True, capture_output=True)
    match = re.search(r"\|\s*(\d+)\s*\|\s*foam_hf$", trace, re.M)
    print("| hook | median start-up | min | runs |")
    print("|---|--:|--:|--:|")
    for state, values in times.items():
        print(f"| {state} | {statistics.median(values) * 1e3:.1f} ms | {min(values) * 1e3:.1f} ms | {len(values)} |")
    if match:
        print(f"\n`-X importtime`, hook on: `import foam_hf` (cumulative) {int(match.group(1)) / 1e3:.1f} ms")


if __name__ == "__main__":
    main()
