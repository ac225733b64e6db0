"""CPU time of `swarmtrain --help` and `swarmtrain peer --help` (lazy imports, issue #16).

    python benchmarks/cli_startup.py --label after      # -> benchmarks/results/cli_startup.json

Each command runs --repeats times in a fresh interpreter; its CPU time (user + system, from
getrusage of the reaped child) is what a volunteer's machine spends before the help appears.
Baselines in the same run: `python -c pass` (the interpreter alone) and
`python -c "import torch, hivemind"` (what an eager import of the training stack costs); the
ratio help / heavy-import says how much of that cost --help still pays, whatever the machine's
load. Results are stored under --label, so a run on the old code (--label before) and one on the
new code sit side by side in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "cli_startup.json"
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "import torch, hivemind": [sys.executable, "-c", "import torch, hivemind"],
    "swarmtrain --help": [sys.executable, "-m", "swarmtrain", "--help"],
    "swarmtrain peer --help": [sys.executable, "-m", "swarmtrain", "peer", "--help"],
    "swarmtrain coordinator --help": [sys.executable, "-m", "swarmtrain", "coordinator", "--help"],
}


def cpu_seconds(command) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, capture_output=True, cwd=REPO,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="after", help="key of this run in the JSON (e.g. before, after)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cpu_seconds(COMMANDS["import torch, hivemind"])  # warm the page cache: the first run reads from disk
    medians = {name: round(statistics.median(cpu_seconds(command) for _ in range(args.repeats)), 3)
               for name, command in COMMANDS.items()}
    heavy = medians["import torch, hivemind"]
    run = {
        "cpu_seconds_median": medians,
        "ratio_to_import_torch_hivemind": {name: round(value / heavy, 3) for name, value in medians.items()},
        "repeats": args.repeats,
        "git_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=REPO).stdout.strip(),
        "python": platform.python_version(), "machine": platform.machine(),
        "load_average": os.getloadavg(),
        "command": f"python benchmarks/cli_startup.py --label {args.label}",
    }
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[args.label] = run
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(run, indent=2))


if __name__ == "__main__":
    main()
