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
PATHS = ("none", "fp16", "gaussiank:0.01", "gaussiank:0.01+8bit")
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


def _peer(peers, rank, spec, schedule, rounds_per_attack, numel, channel, checked, part_bytes=2**19):
    """One peer of (a) / (b): ``schedule`` lists the attacker's attack per block of rounds ("" = honest).
    ``part_bytes``: hivemind's dense part size (it hands out whole parts: small ones let every peer reduce)."""
    round_index = mp.Value("i", 0)  # shared with this peer's averager process (forked below)

    def attack():
        return schedule[min(round_index.value // rounds_per_attack, len(schedule) - 1)]

    if rank == ATTACKER and channel is not None:
        lying.install(attack, channel)
    dht = averager = None
    try:
        dht = peers.start_dht(rank)
        if rank == ACCOMPLICE and channel is not None:
            lying.install_accomplice(str(dht.peer_id), channel, active=lambda: attack().startswith("collude"))
        parameters, averager = make_test_averager(
            spec, dht, prefix="poison", num_peers=peers.num_peers, min_group_size=peers.num_peers, numel=numel,
            ban_list=BanList(ban_seconds=0.0), round_checks=checked, part_size_bytes=part_bytes)
        peers.barrier.wait(60)
        generator, log = torch.Generator().manual_seed(11 + rank), []
        for index in range(len(schedule) * rounds_per_attack):
            round_index.value = index
            raw = accumulate_random_gradients(averager, parameters, generator, rank % 2)
            started, error = time.perf_counter(), ""
            try:
                averager.step(timeout=25, allow_retries=False)
            except Exception as failure:
                error = str(failure)[:600]
            with averager.use_averaged_gradients() as grads:
                applied = torch.cat([grad.reshape(-1) for grad in grads]).clone()
            averager.reset_accumulated_grads_()
            stats = averager.stats.snapshot()
            log.append(dict(raw=raw.numpy(), applied=applied.numpy(), error=error, step_seconds=time.perf_counter() - started,
                            group_size=stats.last_group_size, bytes=stats.last_bytes_sent + stats.last_bytes_received,
                            round_seconds=stats.last_round_seconds, check_bytes=stats.last_check_bytes,
                            check_seconds=stats.last_check_seconds, ok=not error))
            peers.barrier.wait(60)  # next round together
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


def run_cost(spec: str, numel: int, rounds: int) -> dict:
    """Per round: the group's bytes (sum over its 4 peers) and its time (the slowest peer's round, the
    check included), medians over the rounds; with and without the check, back to back."""
    measured = {}
    for checked in (False, True):
        results = ForkedPeers(4).run(_peer, spec, [""], rounds, numel, None, checked, 2**16,
                                     timeout=120 + 40 * rounds, join_timeout=30)
        per_round = [[results[rank]["rounds"][index] for rank in range(4)] for index in range(1, rounds)]  # 0: warm-up
        whole = [group for group in per_round if all(r["ok"] for r in group)]
        if not whole:
            measured["checked" if checked else "unchecked"] = dict(rounds_ok=0, rounds=len(per_round))
            continue
        measured["checked" if checked else "unchecked"] = dict(
            rounds_ok=len(whole), rounds=len(per_round),
            group_bytes=statistics.median(sum(r["bytes"] for r in group) for group in whole),
            group_check_bytes=statistics.median(sum(r["check_bytes"] for r in group) for group in whole),
            round_seconds=statistics.median(max(r["round_seconds"] for r in group) for group in whole),
            check_seconds=statistics.median(max(r["check_seconds"] for r in group) for group in whole),
        )
    plain, checked = measured["unchecked"], measured["checked"]
    if plain.get("rounds_ok") and checked.get("rounds_ok"):
        measured["extra_bytes_ratio"] = checked["group_bytes"] / plain["group_bytes"] - 1.0
        measured["check_bytes_share"] = checked["group_check_bytes"] / checked["group_bytes"]
        measured["extra_time_ratio"] = checked["round_seconds"] / plain["round_seconds"] - 1.0
        measured["check_time_share"] = checked["check_seconds"] / checked["round_seconds"]
    return measured


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
            swarm.wait_until(lambda: all(any(r["ok"] and r["group_size"] == 2 for r in swarm.rounds(i)) for i in (0, 1)),
                             300, "the honest peers' first round together")
            command = lambda *args: [sys.executable, str(REPO / "tests" / "support" / "lying_peer.py"), attack, *args]  # noqa: E731
            swarm.start_peer(2, "--eval-every", "0", command=command)
            swarm.wait_until(lambda: swarm.status(2).get("peer_id") is not None, 180, "the liar to join")
            liar = swarm.status(2)["peer_id"]
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
    result = dict(command=" ".join(sys.argv), load_average_at_start=os.getloadavg(), attacks={}, cost={},
                  training=[])
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("poison_quick.json" if args.quick else "poison.json")

    def save():  # after every section: a later one that fails loses nothing measured before it
        path.write_text(json.dumps(result, indent=1))

    for spec in ([] if args.skip_attacks else paths):
        print(f"(a) {spec}: {', '.join(attacks)}", flush=True)
        result["attacks"][spec] = run_attacks(spec, attacks, rounds, 20_000)
        print(json.dumps(result["attacks"][spec], indent=1), flush=True)
        save()
    for spec in paths:
        for numel in (sizes[:1] if args.quick else sizes):
            print(f"(b) {spec}, {numel} entries", flush=True)
            try:
                result["cost"][f"{spec} {numel}"] = run_cost(spec, numel, 3 if args.quick else args.cost_rounds)
            except AssertionError as failure:  # the peers did not finish their rounds in time: say so, go on
                result["cost"][f"{spec} {numel}"] = dict(error=str(failure))
            print(json.dumps(result["cost"][f"{spec} {numel}"], indent=1), flush=True)
            save()
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
