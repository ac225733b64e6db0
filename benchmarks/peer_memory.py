"""What a training peer really uses in RAM, against what `swarmtrain doctor` says it needs (issue #16).

    nice -n 10 python benchmarks/peer_memory.py --label after          # tiny and ALBERT, ~10 min
    python benchmarks/peer_memory.py --configs tiny --label after      # tiny only, ~1 min

For each config it starts a coordinator and one CPU peer on 127.0.0.1 (--batch-size auto, the
default; ALBERT trains on the Python standard library's top-level modules through --data), samples
the memory of the peer's whole process tree (the trainer, its DHT and averager processes, the p2p
daemon) every 0.5 s until the peer has done --steps local steps, and records the peak of
- PSS summed over the tree (proportional set size: each shared page counted once overall, so this
  is what the machine must have), and
- RSS summed over the tree (shared pages counted in every process: what `top` adds up).
Then it runs `swarmtrain doctor --initial-peers <coordinator> --config <config> --device cpu --json`
against the same coordinator and reads the RAM figure of its memory row, and the doctor's wall time.
Both figures come from the same run: the ratio measured / doctor is the result (1 = exact; the
acceptance band of issue #16 is 0.5..2). Last, it stops the peer with Ctrl+C (SIGINT) and times how
long until its checkpoint is on disk and until it has exited. Results go to
benchmarks/results/peer_memory.json under --label.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from swarmtrain.demo import start_coordinator, start_peer, stop_process  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "peer_memory.json"
CONFIGS = {"tiny": REPO / "configs" / "tiny.yaml", "albert": REPO / "configs" / "pretrain-albert.yaml"}
SIZE = re.compile(r"RAM ([0-9.]+) (B|KiB|MiB|GiB)")
UNITS = {"B": 1, "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3}


def process_tree(root: int) -> list:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def tree_memory(root: int) -> tuple:
    """(PSS, RSS) in bytes, summed over the process tree under `root`."""
    pss = rss = 0
    for pid in process_tree(root):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                key, *value = line.split()
                if key == "Pss:":
                    pss += int(value[0]) * 1024
                elif key == "Rss:":
                    rss += int(value[0]) * 1024
        except OSError:
            pass
    return pss, rss


def data_directory() -> Path:
    """The standard library's top-level modules (168 files, 4.7 MB on Python 3.11): the ALBERT peer's
    --data. A fixed path: the held-out split hashes file names (31 held-out blocks here), so every run
    evaluates the same blocks. (The whole stdlib directory holds site-packages too: gigabytes of tokens.)"""
    data = Path(tempfile.gettempdir()) / "swarmtrain-peer-memory-data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir()
    for source in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        (data / source.name).symlink_to(source)
    return data


def doctor_figure(maddr: str, config: Path, workdir: Path, data: list) -> dict:
    help_text = subprocess.run([sys.executable, "-m", "swarmtrain", "doctor", "--help"], capture_output=True,
                               text=True, cwd=REPO).stdout
    data = data if "--data" in help_text else []  # the doctor before issue #16 had no --data
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "swarmtrain", "doctor", "--initial-peers", maddr, "--config",
                             str(config), "--device", "cpu", "--json", *data], capture_output=True, text=True,
                            cwd=REPO, timeout=900)
    seconds = time.monotonic() - started
    rows = json.loads(result.stdout)
    [memory] = [row for row in rows if row["check"] == "memory"]
    match = SIZE.search(memory["detail"])
    (workdir / "doctor.stderr").write_text(result.stderr)
    return dict(doctor_ram_bytes=int(float(match.group(1)) * UNITS[match.group(2)]) if match else None,
                doctor_detail=memory["detail"], doctor_seconds=round(seconds, 1),
                doctor_progress_lines=len([line for line in result.stderr.splitlines() if line.strip()]))


def stop_latency(peer, checkpoint_dir: Path, timeout: float = 900.0) -> dict:
    """Ctrl+C to the training peer: seconds until its checkpoint is on disk, and until it has exited
    (systemd's TimeoutStopSec=60 in deploy/swarmtrain-peer.service is the budget for both)."""
    started = time.monotonic()
    peer.send_signal(signal.SIGINT)
    saved_after = None
    while time.monotonic() - started < timeout and peer.poll() is None:
        if saved_after is None and any(checkpoint_dir.glob("epoch-*/*.safetensors")):
            saved_after = time.monotonic() - started
        time.sleep(0.2)
    exited_after = time.monotonic() - started if peer.poll() is not None else None
    if saved_after is None and any(checkpoint_dir.glob("epoch-*/*.safetensors")):
        saved_after = exited_after
    return dict(stop_seconds_to_checkpoint=round(saved_after, 1) if saved_after is not None else None,
                stop_seconds_to_exit=round(exited_after, 1) if exited_after is not None else None)


def measure(name: str, steps: int, timeout: float) -> dict:
    config = CONFIGS[name]
    workdir = Path(tempfile.mkdtemp(prefix=f"peer-memory-{name}-"))
    coordinator, maddr = start_coordinator(workdir, config)
    peer = None
    try:
        extra = [] if name == "tiny" else ["--data", str(data_directory())]
        peer = start_peer(workdir, 0, maddr, "--device", "cpu", "--eval-every", "0", "--checkpoint-every", "0",
                          *extra, threads=1)
        peak_pss = peak_rss = 0
        deadline = time.monotonic() + timeout
        status = {}
        while time.monotonic() < deadline and peer.poll() is None:
            pss, rss = tree_memory(peer.pid)
            peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
            try:
                status = json.loads((workdir / "peer-0.json").read_text())
            except (OSError, ValueError):
                pass
            if status.get("step", 0) >= steps:
                break
            time.sleep(0.5)
        if status.get("step", 0) < steps:
            raise RuntimeError(f"{name}: the peer did only {status.get('step', 0)} steps; log in {workdir}")
        figure = doctor_figure(maddr, config, workdir, extra)
        figure.update(stop_latency(peer, workdir / "peer-0"))
    finally:
        if peer is not None:
            stop_process(peer)
        stop_process(coordinator)
    result = dict(config=str(config.relative_to(REPO)), steps=status["step"], batch_size=status.get("batch_size"),
                  measured_peak_pss_bytes=peak_pss, measured_peak_rss_bytes=peak_rss, **figure)
    if result["doctor_ram_bytes"]:
        result["ratio_measured_pss_to_doctor"] = round(peak_pss / result["doctor_ram_bytes"], 3)
        result["ratio_measured_rss_to_doctor"] = round(peak_rss / result["doctor_ram_bytes"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="after")
    parser.add_argument("--configs", default="tiny,albert", help="comma-separated: tiny, albert")
    parser.add_argument("--steps", type=int, default=3, help="local steps before the peak is taken")
    args = parser.parse_args()
    runs = {}
    for name in args.configs.split(","):
        runs[name] = measure(name, args.steps, timeout=1800 if name == "albert" else 300)
        print(json.dumps({name: runs[name]}, indent=2), flush=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.setdefault(args.label, {}).update(runs)
    results[args.label]["meta"] = dict(
        git_commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                  cwd=REPO).stdout.strip(),
        python=platform.python_version(), machine=platform.machine(), cpus=os.cpu_count(),
        command=f"python benchmarks/peer_memory.py --configs {args.configs} --label {args.label}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
