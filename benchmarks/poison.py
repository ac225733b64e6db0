"""Poisoning the averaging round, and what checking it costs (issue #18; swarmtrain/compression/verify.py).

(a) Attacks, on a group of four forked peers (real hivemind groups on 127.0.0.1): two honest peers, an
    attacking reducer and its accomplice (honest but in the collusion rounds). The attacker lies in every
    round; bans are off here, so that every round is a fresh trial of the check. Per attack and averaging
    path: the rounds in which the honest members refused the result, named the attacker, and (dense paths)
    how far what they applied was from the honest average when they did apply it.
(b) Cost: four honest peers with and without the round check, at two gradient sizes (200k entries, and
    7.4M: ALBERT-base of configs/pretrain-albert.yaml): the group's bytes per round and its round time
    (medians over the rounds, measured back to back), and the check's own share of both.
(c) Training: coordinator + two honest peers, without and with a lying reducer joining (the tiny config,
    dense and sparse): the honest peers' held-out loss at the same epochs.

    python benchmarks/poison.py                        # (a) + (b) + (c), ~45 min on 2 shared cores
    python benchmarks/poison.py --skip-training        # (a) + (b), ~20 min
    python benchmarks/poison.py --quick                # smoke run -> benchmarks/results/poison_quick.json
    python benchmarks/poison.py --skip-training --paths none,gaussiank:0.01 --sizes 200000 --rounds-per-attack 2 \
        --cost-rounds 6                                # a subset (~8 min): the figures of BENCHMARKS.md

Results: benchmarks/results/poison.json (and poison.png: the training curves).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

from swarmtrain.access.bans import BanList  # noqa: E402
from tests.support import TINY_CONFIG, lying  # noqa: E402
from tests.support.forked import ForkedPeers, accumulate_random_gradients, make_test_averager  # noqa: E402

HONEST, ATTACKER, ACCOMPLICE = (0, 1), 2, 3
PATHS = ("none", "fp16", "gaussiank:0.01", "gaussiank:0.01+8bit", "gaussiank:0.03+2bit")  # the last: the realistic configs'
ATTACKS = ("scale:10", "scale:-1", "drop-hidden", "drop-weight", "drop-invalid", "collude:10", "scale:1.1",
           "scale:1.01", "scale:1.001")
OUTCOMES = (  # what an honest member's failed round says, in order of precedence
    ("caught: collusion", "impossible for its norm"),
    ("caught: wrong answer", "not the average"),
    ("caught: misreported our part", "misreported the part"),
    ("caught: refused a valid part", "refused our valid part"),
    ("refused: dispute", "disagree"),
    ("refused: outlier", "our own part"),
    ("refused: unverifiable", "no first-hand"),
)


# ------------------------------------------------------------------------------------------------
# (a) attacks and (b) cost: forked peers
# ------------------------------------------------------------------------------------------------


def _enter_namespace(name: str) -> None:
    """Move this (just forked, single-threaded) process into network namespace ``name`` (``ip netns``'s):
    the DHT, its p2p daemon and the averager it forks next all live behind that namespace's link."""
    import ctypes
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    descriptor = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(descriptor, 0x40000000) != 0:  # CLONE_NEWNET
            error = ctypes.get_errno()
            raise OSError(error, f"setns into {name}: {os.strerror(error)}")
    finally:
        os.close(descriptor)


# behind home links: the realistic config's (pretrain-albert.yaml: request_timeout 5, matchmaking_time 15,
# which hivemind.Optimizer makes the next_chunk_timeout); loopback's 3 s chunk timeout cut streams that
# TCP stalled for a few seconds on a 20 Mbit/s link, failing 7.4M-entry rounds with and without the check
HOME_TIMEOUTS = dict(request_timeout=5.0, next_chunk_timeout=15.0)
CHECK_PHASES = ("reveal", "measure", "exchange", "judge")  # crosscheck.RoundCheck.phase_seconds


def _share_check_phases(shared) -> None:
    """After every round check in this process (and the averager it forks next), its phase_seconds go
    into ``shared`` (a multiprocessing Array of len(CHECK_PHASES) doubles) for the peer to log."""
    from swarmtrain.compression import crosscheck

    run = crosscheck.RoundCheck.run

    async def run_and_share(self):
        try:
            return await run(self)
        finally:
            for index, name in enumerate(CHECK_PHASES):
                shared[index] = self.phase_seconds.get(name, 0.0)

    crosscheck.RoundCheck.run = run_and_share


def _peer(peers, rank, spec, schedule, rounds_per_attack, numel, channel, checked, part_bytes=2**19, home=None,
          step_timeout=25.0, keep_vectors=True):
    """One peer of (a) / (b): ``schedule`` lists the attacker's attack per block of rounds ("" = honest).
    ``part_bytes``: hivemind's dense part size (it hands out whole parts: small ones let every peer reduce).
    ``home``: (network namespace, its address) to run this peer behind a home link; None: loopback.
    ``keep_vectors``: report each round's raw and applied gradient ((a) compares them; at 7.4M entries
    they are 60 MB per peer and round, which (b) does not need: its 11-round runs ran the machine out of memory)."""
    if home is not None:
        _enter_namespace(home[0])
    round_index = mp.Value("i", 0)  # shared with this peer's averager process (forked below)
    phases = mp.Array("d", len(CHECK_PHASES))
    _share_check_phases(phases)

    def attack():
        return schedule[min(round_index.value // rounds_per_attack, len(schedule) - 1)]

    if rank == ATTACKER and channel is not None:
        lying.install(attack, channel)
    dht = averager = None
    try:
        dht = peers.start_dht(rank) if home is None else peers.start_dht(rank, host=home[1])
        if rank == ACCOMPLICE and channel is not None:
            lying.install_accomplice(str(dht.peer_id), channel, active=lambda: attack().startswith("collude"))
        parameters, averager = make_test_averager(
            spec, dht, prefix="poison", num_peers=peers.num_peers, min_group_size=peers.num_peers, numel=numel,
            ban_list=BanList(ban_seconds=0.0), round_checks=checked, part_size_bytes=part_bytes,
            allreduce_timeout=step_timeout,  # as a run's averaging_timeout: the round's (and its check's) budget
            **({} if home is None else HOME_TIMEOUTS))
        peers.barrier.wait(60 + step_timeout)
        generator, log = torch.Generator().manual_seed(11 + rank), []
        for index in range(len(schedule) * rounds_per_attack):
            round_index.value = index
            raw = accumulate_random_gradients(averager, parameters, generator, rank % 2)
            started, error = time.perf_counter(), ""
            phases[:] = [0.0] * len(CHECK_PHASES)
            try:
                averager.step(timeout=step_timeout, allow_retries=False)
            except Exception as failure:
                error = str(failure)[:600]
            with averager.use_averaged_gradients() as grads:
                applied = torch.cat([grad.reshape(-1) for grad in grads]).clone()
            averager.reset_accumulated_grads_()
            stats = averager.stats.snapshot()
            vectors = dict(raw=raw.numpy(), applied=applied.numpy()) if keep_vectors else {}
            log.append(dict(**vectors, error=error, step_seconds=time.perf_counter() - started,
                            group_size=stats.last_group_size, bytes=stats.last_bytes_sent + stats.last_bytes_received,
                            round_seconds=stats.last_round_seconds, check_bytes=stats.last_check_bytes,
                            check_seconds=stats.last_check_seconds, ok=not error,
                            check_phases=dict(zip(CHECK_PHASES, phases[:]))))
            peers.barrier.wait(60 + step_timeout)  # next round together (the slowest may use its whole budget)
        peers.report(rank, dict(peer_id=str(dht.peer_id), rounds=log))
        peers.wait_until_done(30)
    finally:
        if averager is not None:
            averager.shutdown()
        if dht is not None:
            dht.shutdown()


def _outcome(error: str) -> str:
    if not error:
        return "applied"
    for name, marker in OUTCOMES:
        if marker in error:
            return name
    return "failed: other"


def run_attacks(spec: str, attacks, rounds_per_attack: int, numel: int) -> dict:
    channel = mp.get_context("fork").Array("c", 1 << 14)
    results = ForkedPeers(4).run(_peer, spec, list(attacks), rounds_per_attack, numel, channel, True, 2**14,
                                 timeout=120 + 40 * rounds_per_attack * len(attacks), join_timeout=30)
    attacker, accomplice = results[ATTACKER]["peer_id"], results[ACCOMPLICE]["peer_id"]
    table = {}
    for position, attack in enumerate(attacks):
        block = slice(position * rounds_per_attack, (position + 1) * rounds_per_attack)
        rows = {"outcomes": {}, "attacker_named": 0, "accomplice_named": 0, "honest_rounds": 0,
                "max_relative_error_applied": None}
        errors = []
        for number, rounds in enumerate(zip(*(results[rank]["rounds"][block] for rank in range(4)))):
            everyone = [r["raw"] for r in rounds]
            honest_average = np.mean(everyone, axis=0)  # everyone sends an honest gradient
            for rank in HONEST:
                r = rounds[rank]
                rows["honest_rounds"] += 1
                outcome = _outcome(r["error"])
                rows["outcomes"][outcome] = rows["outcomes"].get(outcome, 0) + 1
                rows["attacker_named"] += attacker in r["error"] and outcome.startswith("caught")
                rows["accomplice_named"] += accomplice in r["error"] and outcome.startswith("caught")
                if r["ok"] and not spec.startswith(("gaussiank", "topk", "randomk")):
                    errors.append(float(np.linalg.norm(r["applied"] - honest_average) / np.linalg.norm(honest_average)))
        rows["max_relative_error_applied"] = max(errors) if errors else None
        table[attack] = rows
    return table


def _round_budget(spec: str, numel: int, network) -> float:
    """Seconds a round may take: 25 s on loopback; behind home links, plus 4x the time to push a dense
    vector (fp32 or fp16) through one link each way."""
    if network is None:
        return 25.0
    bytes_per_entry = 0.1 if spec.startswith("gaussiank") else (2 if "fp16" in spec else 4)
    return 25.0 + 4 * 2 * numel * bytes_per_entry * 8 / network.rate_bits


def run_cost(spec: str, numel: int, rounds: int, network=None) -> dict:
    """Per round: the group's bytes (sum over its 4 peers) and its time (the slowest peer's round, the
    check included; and the slowest peer's whole step, matchmaking included), medians over the rounds;
    with and without the check, back to back. ``network``: wan.Namespaces (peers on nodes 1-4, each
    behind its own capped, delayed link), None: loopback."""
    homes = None if network is None else [(network.names[rank + 1], network.address(rank + 1)) for rank in range(4)]
    budget = _round_budget(spec, numel, network)
    # dense: hivemind's default parts where there are enough of them for every peer to reduce, else small ones
    part_bytes = 2**19 if numel * 4 >= 16 * 2**19 else 2**16
    measured = {}
    for checked in (False, True):
        results = ForkedPeers(4).run(_cost_peer, homes, spec, rounds, numel, checked, part_bytes, budget,
                                     timeout=120 + (budget + 20) * rounds, join_timeout=30)
        per_round = [[results[rank]["rounds"][index] for rank in range(4)] for index in range(1, rounds)]  # 0: warm-up
        whole = [group for group in per_round if all(r["ok"] for r in group)]
        name = "checked" if checked else "unchecked"
        if not whole:
            measured[name] = dict(rounds_ok=0, rounds=len(per_round),
                                  errors=sorted({r["error"][:200] for group in per_round for r in group if r["error"]}))
            continue
        measured[name] = dict(
            rounds_ok=len(whole), rounds=len(per_round),
            group_bytes=statistics.median(sum(r["bytes"] for r in group) for group in whole),
            group_check_bytes=statistics.median(sum(r["check_bytes"] for r in group) for group in whole),
            round_seconds=statistics.median(max(r["round_seconds"] for r in group) for group in whole),
            check_seconds=statistics.median(max(r["check_seconds"] for r in group) for group in whole),
            step_seconds=statistics.median(max(r["step_seconds"] for r in group) for group in whole),
            round_seconds_all=[max(r["round_seconds"] for r in group) for group in whole],
            # where the check's time goes: per phase, the slowest peer's, median over the rounds
            check_phase_seconds={name: statistics.median(max(r["check_phases"][name] for r in group) for group in whole)
                                 for name in CHECK_PHASES},
        )
    plain, checked = measured["unchecked"], measured["checked"]
    if plain.get("rounds_ok") and checked.get("rounds_ok"):
        measured["bytes_ratio"] = checked["group_bytes"] / plain["group_bytes"]
        measured["round_time_ratio"] = checked["round_seconds"] / plain["round_seconds"]
        measured["step_time_ratio"] = checked["step_seconds"] / plain["step_seconds"]
        measured["extra_bytes_ratio"] = measured["bytes_ratio"] - 1.0
        measured["check_bytes_share"] = checked["group_check_bytes"] / checked["group_bytes"]
        measured["extra_time_ratio"] = measured["round_time_ratio"] - 1.0
        measured["check_time_share"] = checked["check_seconds"] / checked["round_seconds"]
    return measured


def _cost_peer(peers, rank, homes, spec, rounds, numel, checked, part_bytes, budget):
    """An honest peer of (b), behind its home link when ``homes`` (one (namespace, address) per rank)."""
    _peer(peers, rank, spec, [""], rounds, numel, None, checked, part_bytes, None if homes is None else homes[rank],
          budget, keep_vectors=False)


# ------------------------------------------------------------------------------------------------
# (c) training with a liar: the command line, as a volunteer runs it
# ------------------------------------------------------------------------------------------------


def run_training(compression: str, attack: str, epochs: int, eval_every: int) -> dict:
    from swarmtrain.demo import free_port
    from tests.support.swarm import LocalSwarm

    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["averaging"]["compression"] = compression
    workdir = Path(tempfile.mkdtemp(prefix="poison-"))
    config_path = workdir / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    swarm = LocalSwarm(workdir, config_path, metrics_port=free_port())
    liar, started = None, time.monotonic()
    try:
        common = ("--max-epochs", str(epochs), "--eval-every", str(eval_every))
        swarm.start_peer(0, *common)
        swarm.start_peer(1, *common)
        if attack:
            command = lambda *args: [sys.executable, str(REPO / "tests" / "support" / "lying_peer.py"), attack, *args]  # noqa: E731
            liar = swarm.start_liar_once_the_pair_met(2, command, pair_timeout=300, join_timeout=180)
        swarm.wait_for_exit([0, 1], timeout=1800)
    finally:
        swarm.close()
    peers = {}
    for index in (0, 1):
        rounds = swarm.rounds(index)
        peers[f"peer-{index}"] = dict(
            heldout_loss=swarm.status(index)["heldout_loss"],
            rounds_ok=sum(r["ok"] for r in rounds), rounds_failed=sum(not r["ok"] for r in rounds),
            rounds_applied_with_liar=sum(r["ok"] and r["group_size"] == 3 for r in rounds),
            banned_liar=liar is not None and f"banning peer {liar}" in swarm.log(index))
    return dict(compression=compression, attack=attack or None, epochs=epochs, peers=peers,
                seconds=time.monotonic() - started)


def _plot(training: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, compression in zip(axes, sorted({run["compression"] for run in training})):
        for run in (r for r in training if r["compression"] == compression):
            curve = run["peers"]["peer-0"]["heldout_loss"]
            axis.plot([e for e, _ in curve], [loss for _, loss in curve], marker="o",
                      label=f"with a liar ({run['attack']})" if run["attack"] else "without")
        axis.set_title(f"compression: {compression}")
        axis.set_xlabel("epoch")
        axis.legend()
    axes[0].set_ylabel("held-out loss (honest peer-0)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: one path, few rounds, no training")
    parser.add_argument("--skip-training", action="store_true", help="skip (c)")
    parser.add_argument("--skip-attacks", action="store_true", help="skip (a)")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help=f"(a), (b): comma-separated averaging paths (compression specs), of {', '.join(PATHS)}")
    parser.add_argument("--sizes", default="200000,7400000", help="(b): comma-separated gradient sizes (entries)")
    parser.add_argument("--rounds-per-attack", type=int, default=4, help="(a): rounds per attack and path")
    parser.add_argument("--cost-rounds", type=int, default=11, help="(b): rounds per configuration (+1 warm-up)")
    parser.add_argument("--epochs", type=int, default=24, help="(c): epochs of each training run")
    parser.add_argument("--network", choices=("loopback", "home"), default="loopback",
                        help="(b): loopback (127.0.0.1, no caps), or home: each peer in its own network namespace "
                             "behind a capped, delayed link (benchmarks/wan.py's; needs root). The figures go to "
                             "the results' 'cost' (loopback) or 'cost_home' section; the other sections of an "
                             "existing results file are kept")
    parser.add_argument("--rate", default="20mbit", help="(b) --network home: each peer's link rate, each way")
    parser.add_argument("--delay", default="30ms", help="(b) --network home: each peer's link delay, each way")
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = [path for path in args.paths.split(",") if path]
    unknown = [path for path in paths if path not in PATHS]
    if unknown:
        parser.error(f"--paths: unknown path(s) {', '.join(unknown)}; choose among {', '.join(PATHS)}")
    try:
        sizes = [int(size) for size in args.sizes.split(",") if size]
    except ValueError:
        parser.error(f"--sizes: {args.sizes!r} is not a comma-separated list of integers (e.g. 200000,7400000)")
    paths = paths[:1] if args.quick else paths
    attacks = ATTACKS[:3] if args.quick else ATTACKS
    rounds = 2 if args.quick else args.rounds_per_attack
    import os

    # the machine's load while measuring (2 cores shared with other work): times are only comparable
    # within one run, as ratios of checked to unchecked rounds measured back to back
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("poison_quick.json" if args.quick else "poison.json")
    cost_section = "cost" if args.network == "loopback" else "cost_home"
    # sections this run does not measure keep their figures (and the command that measured them)
    result = json.loads(path.read_text()) if path.exists() else {}
    commands = result.pop("commands", {})
    if "command" in result:  # the format before --network: one command for every section
        old = dict(command=result.pop("command"), load_average_at_start=result.pop("load_average_at_start", None))
        commands.update({section: old for section in ("attacks", "cost", "training") if result.get(section)})
    here = dict(command=" ".join(sys.argv), load_average_at_start=os.getloadavg())
    # (a) and (c) are measured whole; (b)'s figures are replaced per path and size, each with its command
    for section in ([] if args.skip_attacks else ["attacks"]) + ([] if args.quick or args.skip_training else ["training"]):
        result[section] = [] if section == "training" else {}
        commands[section] = here
    result.setdefault("attacks", {}), result.setdefault("training", [])
    result.setdefault("cost", {}), result.setdefault(cost_section, {})
    result["commands"] = commands
    if args.network == "home":
        from benchmarks.wan import Namespaces, cleanup_stale_namespaces, install_signal_handlers, namespaces_unavailable

        reason = namespaces_unavailable()
        if reason:
            parser.error(f"--network home: cannot build network namespaces ({reason}); run as root, or --network loopback")
    result["cost_network"] = "loopback 127.0.0.1, no caps"

    def save():  # after every section: a later one that fails loses nothing measured before it
        path.write_text(json.dumps(result, indent=1))

    for spec in ([] if args.skip_attacks else paths):
        print(f"(a) {spec}: {', '.join(attacks)}", flush=True)
        result["attacks"][spec] = run_attacks(spec, attacks, rounds, 20_000)
        print(json.dumps(result["attacks"][spec], indent=1), flush=True)
        save()
    network = None
    try:
        if args.network == "home":
            cleanup_stale_namespaces()
            network = Namespaces(5, args.rate, args.delay)  # node 0 (wan.py's uncapped server) stays unused
            install_signal_handlers()  # SIGTERM / SIGHUP: the namespaces are still deleted (finally below)
            network.build()
            if network.delay_line is not None:
                # the link emulation must not starve with the (niced) peers on a loaded machine
                os.setpriority(os.PRIO_PROCESS, network.delay_line.pid, 0)
            result["cost_home_network"] = network.description
        for spec in paths:
            for numel in (sizes[:1] if args.quick else sizes):
                print(f"(b) {spec}, {numel} entries, {args.network}", flush=True)
                try:
                    figures = run_cost(spec, numel, 3 if args.quick else args.cost_rounds, network)
                except AssertionError as failure:  # the peers did not finish their rounds in time: say so, go on
                    figures = dict(error=str(failure))
                figures.update(here)
                result[cost_section][f"{spec} {numel}"] = figures
                print(json.dumps({k: v for k, v in figures.items() if "ratio" in k or "error" in k}), flush=True)
                save()
    finally:
        if network is not None:
            network.close()
    if not (args.quick or args.skip_training):
        for compression, attack in (("none", ""), ("none", "scale:10"), ("gaussiank:0.05", ""),
                                    ("gaussiank:0.05", "scale:-1")):
            print(f"(c) {compression}, attack {attack or 'none'}", flush=True)
            result["training"].append(run_training(compression, attack, args.epochs, 6))
            print(json.dumps(result["training"][-1]["peers"], indent=1), flush=True)
            save()
        _plot(result["training"], RESULTS / "poison.png")
    save()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
