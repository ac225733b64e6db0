"""Simulator vs real swarm: optimizer steps per minute on the tiny config, 4 peers, same machine, same run.

    python benchmarks/simulate_speed.py                   # ~5-15 min depending on the machine's load
    python benchmarks/simulate_speed.py --epochs 20 --config-mode local
    python benchmarks/simulate_speed.py --epochs 10 --workers 2 --repeats 3

The real swarm is benchmarks/wan.py's loopback runner (a coordinator and 4 `swarmtrain peer` processes
on 127.0.0.1, the peers starting their first step together) on configs/tiny.yaml for --epochs epochs;
its rate is every peer's local steps over the wall time from the common start to the last peer's final
epoch. The simulator then runs the same config, 4 peers, at the batch size the real peers picked, for
the same number of epochs, with --workers processes running the peers' forward and backward passes (its
own and forked ones; default: one per core, at most one per peer; swarmtrain/simulate/workers.py), one
torch thread each; then once more in one process (--workers 1) for reference; --repeats times
in turn, the ratios' medians reported. A rate is the
local steps over the wall time of the run (the simulation's set-up -- building the models -- excluded, as
the real swarm's start-up is; forking the workers included). Reported: the rates and their ratios (the
acceptance asks for >= 5x), and the CPU seconds each used (the real swarm's: every process it started,
from start-up to shutdown; the simulator's: its process and its workers). On a machine shared with other
work the wall-clock rates depend on how much of the CPU each got: the kernel shares it per runnable
process, so a 4-process swarm gets about 4 shares where a 1-process simulator gets one. Two torch
threads in one process were measured worse than one under load (their OpenMP threads spin-wait:
137 against 487 steps/min at load 13), hence worker processes. JSON: benchmarks/results/simulate_speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import wan  # noqa: E402  (benchmarks/wan.py: the real swarm's runner)


def real_swarm(args, averaging: dict) -> dict:
    from swarmtrain.net.identity import load_or_create_identity

    workroot = Path(tempfile.mkdtemp(prefix="swarmtrain-speed-", dir=args.workdir))
    identities = [workroot / f"node{i}.id" for i in range(args.peers + 1)]
    for path in identities:
        load_or_create_identity(path)
    net = wan.Loopback(args.peers + 1)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = wan.run_once("speed", averaging, net, workroot / "run", epochs=args.epochs, seed=0, peers=args.peers,
                          batch_multiplier=1, identities=identities, timeout=args.timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    statuses = [json.loads((workroot / "run" / f"peer-{i}" / "status.json").read_text()) for i in range(args.peers)]
    steps = sum(status["step"] for status in statuses)
    return dict(ok=result.ok, note=result.note, wall_seconds=result.wall_seconds, steps=steps,
                steps_per_peer=[status["step"] for status in statuses],
                batch_sizes=[status["batch_size"] for status in statuses],
                rounds_ok_per_peer=[sum(r["ok"] for r in status.get("rounds", [])) for status in statuses],
                cpu_seconds_all_processes_start_to_end=cpu,
                optimizer_steps_per_minute=60.0 * steps / result.wall_seconds if result.wall_seconds else None)


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def simulated_swarm(args, averaging: dict, batch_size: int, workers: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from swarmtrain.config import parse_run_config
    from swarmtrain.simulate import SimulationOptions, simulate

    config = parse_run_config(wan.run_config_dict(averaging, args.epochs, 0, 1))
    ticks = -(-args.epochs * config.target_batch_size // (args.peers * batch_size))
    before = _cpu_seconds()
    result = simulate(config, SimulationOptions(peers=args.peers, steps=ticks, batch_size=batch_size,
                                                eval_every=10**9, workers=workers)).to_dict()
    steps = sum(result["steps_per_peer"])
    return dict(wall_seconds=result["wall_seconds"], steps=steps, workers=workers,
                cpu_seconds_with_set_up=_cpu_seconds() - before, epochs=result["epochs"], batch_size=batch_size,
                rounds=result["rounds_done"], final_heldout_loss=result["final_heldout_loss"],
                optimizer_steps_per_minute=result["optimizer_steps_per_minute"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--config-mode", choices=["sync", "local"], default="sync",
                        help="sync: configs/tiny.yaml as it is; local: constant:4 local updates, fp16")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--workers", type=int, default=None,
                        help="the simulator's computing processes, its own included (default: one per core, at most --peers)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure this many times (real swarm, simulator, simulator in one process, in turn); "
                             "the ratios' medians are reported")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--output", default=str(HERE / "results" / "simulate_speed.json"))
    args = parser.parse_args()
    averaging = {} if args.config_mode == "sync" else dict(mode="local", schedule="constant:4", compression="fp16")
    wan.install_signal_handlers()
    started = os.getloadavg()
    repeats = []
    for repeat in range(args.repeats):
        real = real_swarm(args, averaging)
        print(f"real swarm: {real}", flush=True)
        batch_size = int(statistics.median(real["batch_sizes"]))
        simulated = simulated_swarm(args, averaging, batch_size, args.workers or min(os.cpu_count() or 1, args.peers))
        print(f"simulator: {simulated}", flush=True)
        in_process = simulated_swarm(args, averaging, batch_size, 1)
        print(f"simulator in one process: {in_process}", flush=True)
        real_rate = real["optimizer_steps_per_minute"]
        repeats.append(dict(real_swarm=real, simulator=simulated, simulator_in_one_process=in_process,
                            load_average_end=os.getloadavg(),
                            steps_per_minute_ratio=simulated["optimizer_steps_per_minute"] / real_rate if real_rate else None,
                            steps_per_minute_ratio_in_one_process=(in_process["optimizer_steps_per_minute"] / real_rate
                                                                   if real_rate else None)))
        print(f"repeat {repeat}: simulator / real swarm optimizer steps per minute: "
              f"{repeats[-1]['steps_per_minute_ratio']}x ({repeats[-1]['steps_per_minute_ratio_in_one_process']}x "
              f"in one process)", flush=True)
    ratios = [r["steps_per_minute_ratio"] for r in repeats if r["steps_per_minute_ratio"] is not None]
    ratios_in_process = [r["steps_per_minute_ratio_in_one_process"] for r in repeats
                         if r["steps_per_minute_ratio_in_one_process"] is not None]
    report = dict(command=" ".join([Path(sys.executable).name, *sys.argv]), peers=args.peers, epochs=args.epochs,
                  config=yaml.safe_load(yaml.safe_dump(wan.run_config_dict(averaging, args.epochs, 0, 1))),
                  cpus=os.cpu_count(), load_average_start=started, load_average_end=os.getloadavg(),
                  median_steps_per_minute_ratio=statistics.median(ratios) if ratios else None,
                  median_steps_per_minute_ratio_in_one_process=(statistics.median(ratios_in_process)
                                                                if ratios_in_process else None),
                  repeats=repeats, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1))
    if not ratios:
        print("the real swarm took no steps: no ratio")
    else:
        print(f"simulator / real swarm optimizer steps per minute, median of {len(ratios)}: "
              f"{report['median_steps_per_minute_ratio']:.1f}x "
              f"({report['median_steps_per_minute_ratio_in_one_process']:.1f}x in one process)")

if __name__ == "__main__":
    main()
