"""`swarmtrain simulate`: a run config's swarm simulated in one process (swarmtrain/simulate)."""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import click
import yaml

from swarmtrain.errors import UserError


def _parse_list(text: str, kind, flag: str, example: str) -> list:
    try:
        return [kind(item) for item in text.replace(" ", "").split(",") if item]
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a comma-separated list, e.g. {flag} {example}") from None


def _parse_plan(values: Tuple[str, ...], flag: str) -> Dict[int, int]:
    plan = {}
    for value in values:
        peer, _, tick = value.partition(":")
        if not (peer.isdigit() and tick.isdigit()):
            raise UserError(f"{flag} {value!r}: use PEER:TICK, e.g. {flag} 3:500 (peer 3 at tick 500)")
        plan[int(peer)] = int(tick)
    return plan


def apply_overrides(config, overrides: Tuple[str, ...]):
    """The config with `section.field=value` overrides (YAML values), validated like a config file."""
    from swarmtrain.config import parse_run_config

    if not overrides:
        return config
    data = config.model_dump(mode="json")
    for override in overrides:
        path, sep, text = override.partition("=")
        keys = path.strip().split(".")
        if not sep or not all(keys):
            raise UserError(f"--set {override!r}: use SECTION.FIELD=VALUE, e.g. --set averaging.compression=gaussiank:0.02")
        target = data
        for key in keys[:-1]:
            target = target.setdefault(key, {}) if isinstance(target, dict) else None
            if not isinstance(target, dict):
                raise UserError(f"--set {override!r}: {key} is not a section of the run config")
        if text.strip():
            target[keys[-1]] = yaml.safe_load(text)
        else:  # an empty value removes the field: its default applies
            target.pop(keys[-1], None)
    return parse_run_config(data, source="config with --set")


def _summary(results: List[dict]) -> str:
    lines = [f"{'seed':>4}  {'held-out loss':>13}  {'rounds':>6}  {'averaging MB sent/peer':>22}  {'steps/min':>9}"]
    for result in results:
        lines.append(f"{result['seed']:>4}  {result['final_heldout_loss']:>13.4f}  {result['rounds_done']:>6}  "
                     f"{result['bytes_sent_per_peer'] / 1e6:>22.3f}  {result['optimizer_steps_per_minute']:>9.0f}")
    losses = [r["final_heldout_loss"] for r in results if math.isfinite(r["final_heldout_loss"])]
    if len(losses) > 1:
        lines.append(f"mean held-out loss {statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f} (sd over seeds)")
    return "\n".join(lines)


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), required=True,
              help="The run config to simulate (its model, data, optimizer, target batch size, averaging).")
@click.option("--peers", type=click.IntRange(min=1, max=256), default=4, show_default=True,
              help="Simulated peers.")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Local steps of a full-speed peer (ticks of the simulation).")
@click.option("--max-epochs", type=click.IntRange(min=1), default=None,
              help="Stop when the swarm reaches this epoch (default: run all --steps).")
@click.option("--seeds", default="0", show_default=True,
              help="Comma-separated seeds; each runs the whole simulation (model init = run seed + seed).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Samples per local step of every peer.")
@click.option("--speeds", default=None, help="Per peer, the share of ticks it steps in, e.g. 1,1,0.5,0.25 "
                                             "(heterogeneous machines; default all 1).")
@click.option("--shards", type=click.Choice(["shared", "disjoint"]), default="shared", show_default=True,
              help="shared: every peer reads all the data in its own order; disjoint: each reads only its own "
                   "contiguous 1/N of it (non-identical data).")
@click.option("--join", "joins", multiple=True, metavar="PEER:TICK",
              help="Peer PEER joins at tick TICK (downloads the averaged state); repeatable.")
@click.option("--leave", "leaves", multiple=True, metavar="PEER:TICK", help="Peer PEER leaves at tick TICK; repeatable.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="Override a config field (a YAML value; empty: back to its default), e.g. "
                   "--set averaging.compression=gaussiank:0.02+2bit; repeatable.")
@click.option("--eval-every", type=click.IntRange(min=1), default=100, show_default=True,
              help="Measure the held-out loss of the swarm's model about every this many ticks.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes that run the peers' forward and backward passes, this one included, one core each "
                   "(e.g. the machine's free cores); 1: all in this process. The results are the same.")
@click.option("--overlap-delay", type=click.IntRange(min=0), default=0, show_default=True,
              help="Mode local with averaging.overlap: ticks a round takes to land while the peers step on (a real "
                   "round's seconds over a local step's); 0: every round lands at once.")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Write every seed's result (learning curve, rounds, bytes) to this JSON file.")
def simulate(config_path, peers, steps, max_epochs, seeds, batch_size, speeds, shards, joins, leaves, overrides, eval_every,
             workers, overlap_delay, output):
    """Simulate the swarm of a run config in this process: N peers train the run's model on the run's
    data and average through the swarm's own compression and schedule code, with the network replaced
    by an exact in-memory reduction. Prints the held-out loss reached and the averaging bytes each peer
    would send, to choose a compression, density and period before a run.

    \b
    swarmtrain simulate --config run.yaml --peers 8 --steps 2000 --seeds 0,1,2
    swarmtrain simulate --config run.yaml --set averaging.compression=gaussiank:0.02+2bit --set averaging.feedback_decay=0.95

    Ctrl+C stops the simulation; what ran so far is reported (and written to --output).
    """
    from swarmtrain.config import load_run_config
    from swarmtrain.simulate import SimulationOptions, simulate as run_simulation

    config = apply_overrides(load_run_config(config_path), overrides)
    speed_list = _parse_list(speeds, float, "--speeds", "1,1,0.5,0.25") if speeds else None
    options = [SimulationOptions(peers=peers, steps=steps, batch_size=batch_size, seed=seed, speeds=speed_list,
                                 joins=_parse_plan(joins, "--join"), leaves=_parse_plan(leaves, "--leave"),
                                 disjoint_shards=shards == "disjoint", eval_every=eval_every,
                                 max_epochs=max_epochs, workers=workers, overlap_delay=overlap_delay)
               for seed in _parse_list(seeds, int, "--seeds", "0,1,2")]
    for option in options:
        option.check()
    if overlap_delay and config.averaging.mode != "local":
        raise click.UsageError("--overlap-delay models mode local's background rounds; this config is mode sync")
    if config.averaging.overlap and not overlap_delay:
        click.echo("note: averaging.overlap is simulated only with --overlap-delay TICKS; every round lands at once",
                   err=True)
    results = []
    for option in options:
        click.echo(f"seed {option.seed}: {peers} peers, {steps} steps, {config.averaging.mode} mode, "
                   f"compression {config.averaging.compression}", err=True)
        result = run_simulation(config, option, on_progress=lambda tick, epoch, loss: click.echo(
            f"  tick {tick}/{steps}  epoch {epoch}  held-out loss {loss:.4f}", err=True)).to_dict()
        results.append(result)
        if output:
            _write(output, config, results)
        if result["stopped_early"]:
            click.echo("stopped: the results so far follow", err=True)
            break
    click.echo(_summary(results))
    if results and results[-1]["stopped_early"]:
        sys.exit(130)


def _write(path: str, config, results: List[dict]) -> None:
    from swarmtrain.config import dump_run_config

    Path(path).write_text(json.dumps(dict(config=yaml.safe_load(dump_run_config(config)), results=results), indent=1))
