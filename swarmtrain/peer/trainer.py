"""A volunteer's peer: join the swarm, get the run from it, train until told to stop."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import List, Optional

import torch

from swarmtrain import __version__
from swarmtrain.checkpoint import (latest_checkpoint_path, load_checkpoint, model_state_mismatch,
                                   optimizer_state_mismatch, save_checkpoint)
from swarmtrain.data import load_corpus, peer_batches
from swarmtrain.errors import UserError
from swarmtrain.identity import load_or_create_identity
from swarmtrain.models import EMBEDDED_INPUT_LAYER, build_model, compute_loss, heldout_loss
from swarmtrain.network import (WIRE_VERSION, NeighbourhoodKeeper, fetch_run_config, make_dht, peer_id_in,
                                progress_records)
from swarmtrain.peer.display import ProgressDisplay
from swarmtrain.peer.optimizer import NO_OTHER_PEERS, make_optimizer
from swarmtrain.peer.reporting import RECORD_TTL, PeerReporter
from swarmtrain.peer.resources import (halved_after_out_of_memory, is_out_of_memory, pick_batch_size,
                                       resolve_precision)
from swarmtrain.privacy import attach_privacy_head
from swarmtrain.reachability import start_dht_checking_reachability
from swarmtrain.signals import (StopRequested, children_ignore_interrupts, raise_if_stop_requested,
                                raise_on_stop_signals)

logger = logging.getLogger("swarmtrain.peer")


@dataclass
class PeerOptions:
    initial_peers: List[str]
    run_id: Optional[str] = None  # when given, refuse to train any other run
    device: str = "auto"
    batch_size: Optional[int] = 8  # None: sized to memory (swarmtrain/peer/resources.py)
    max_memory: Optional[int] = None  # bytes this peer may use for training (with batch_size None)
    precision: str = "auto"  # auto (bf16 on GPUs that have it), fp32 or bf16
    data: Optional[str] = None
    identity: Optional[str] = None
    host_maddrs: List[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    announce_maddrs: List[str] = field(default_factory=list)
    client_mode: bool = False
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 10  # epochs
    max_epochs: Optional[int] = None
    eval_every: int = 10  # epochs
    status_file: Optional[str] = None
    show_progress: Optional[bool] = None  # None: a live bar when stderr is a terminal
    metrics_port: Optional[int] = None  # serve this peer's own /metrics here
    port: Optional[int] = None  # the fixed listen port, when given (for the reachability advice)
    upload_mbps: Optional[float] = None  # this machine's uplink, for averaging's load balancing
    role: str = "trainer"  # trainer, trunk or data-owner (split runs: swarmtrain/privacy/swarm.py)
    data_owner_data: Optional[str] = None  # data-owner: an .npz with x and y (default: embedded digits)
    max_steps: Optional[int] = None  # data-owner: leave after this many steps
    wait_for_peers: int = 1  # hold the first step until this many peers (this one included) train the run
    wait_for_peers_timeout: float = 300.0  # ...or until this many seconds have passed


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: this machine has no CUDA device (or torch was built without CUDA); use --device cpu")
        index = torch.device(name).index or 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device(name)


def _write_status(path: Optional[str], status: dict) -> None:
    if path is None:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(status, handle)
    os.replace(tmp, path)


def run_peer(options: PeerOptions) -> dict:
    """Train until max_epochs or a stop signal; returns the final status (also in status_file)."""
    device = resolve_device(options.device)
    if options.batch_size is not None and options.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if options.batch_size is not None and options.max_memory is not None:
        raise UserError("--max-memory sizes the batch per step: use it with --batch-size auto, not a fixed size")
    precision = resolve_precision(options.precision, device)
    private_key = load_or_create_identity(options.identity)
    from hivemind.dht.crypto import RSASignatureValidator

    signature_validator = RSASignatureValidator(private_key)
    trusted = [peer_id_in(maddr) for maddr in options.initial_peers]

    dht = optimizer = reporter = model = corpus = None
    status = {"phase": "starting", "step": 0, "epoch": 0, "loss": None, "samples_per_second": 0.0,
              "rounds": [], "heldout_loss": [], "version": __version__}
    raise_on_stop_signals()
    try:
        with children_ignore_interrupts():
            # join as a full peer, ask the swarm to dial us back, and fall back to client mode
            # (one warning line with the fix) when nobody can
            dht, network_mode = start_dht_checking_reachability(
                lambda client_mode: make_dht(
                    initial_peers=options.initial_peers, host_maddrs=options.host_maddrs,
                    announce_maddrs=options.announce_maddrs, identity_path=options.identity,
                    client_mode=client_mode, signature_validator=signature_validator,
                ),
                client_mode=options.client_mode, initial_peers=options.initial_peers,
                listen_port=options.port, log=logger,
            )
        client_mode = network_mode.client_mode
        published = fetch_run_config(dht, trusted)
        config = published.config
        if options.run_id is not None and options.run_id != config.run_id:
            raise UserError(f"the initial peer serves run {config.run_id!r}, not {options.run_id!r}; check --run-id or the address")
        if published.wire_version != WIRE_VERSION:
            raise UserError(f"the run needs swarmtrain wire version {published.wire_version}, this is {WIRE_VERSION}; upgrade swarmtrain")
        status.update(run_id=config.run_id, peer_id=str(dht.peer_id), device=str(device), client_mode=client_mode)
        if config.privacy.split is not None or options.role != "trainer":  # a split run's roles
            from swarmtrain.privacy import swarm as split_swarm

            serve = split_swarm.run_data_owner_peer if options.role == "data-owner" else split_swarm.serve_trunk
            return serve(dht, config, signature_validator, options, status, client_mode=client_mode)
        logger.info(f"joined run {config.run_id!r} as {dht.peer_id} on {device}")

        neighbourhood = NeighbourhoodKeeper(dht, options.initial_peers)
        neighbourhood.refresh_now()  # meet the peers that started with us before the tracker looks
        corpus = load_corpus(config.data, options.data)
        logger.info(f"data: {corpus.description}")
        heldout = corpus.heldout.to(device)
        model = build_model(config.model, config.data.seq_len, config.seed).to(device)
        try:
            privacy_head = attach_privacy_head(model, config.privacy, input_layer=EMBEDDED_INPUT_LAYER[config.model.kind])
        except (AttributeError, KeyError, ValueError) as error:
            raise UserError(f"privacy.cut_layer {config.privacy.cut_layer!r}: {error}") from None
        probe_generator = torch.Generator().manual_seed(0)

        def probe_loss(batch_size: int) -> torch.Tensor:
            with precision.autocast():
                return compute_loss(model, corpus.train[:batch_size].clone().to(device), config.model.kind, probe_generator)

        batch_size = pick_batch_size(options.batch_size, options.max_memory, model, probe_loss, device,
                                     eight_bit=config.optimizer.eight_bit,
                                     target_batch_size=min(config.target_batch_size, corpus.train.shape[0]))
        status.update(batch_size=batch_size, precision=precision.name)
        if precision.name != "fp32":
            logger.info(f"mixed precision: {precision.name} autocast (weights, gradients and averaging stay fp32)")
        resumed = _checkpoint_to_resume(options.checkpoint_dir, config, model)
        if resumed is not None:
            model.load_state_dict(resumed.model_state)
            logger.info(f"resuming from {resumed.path} (epoch {resumed.epoch})")

        with children_ignore_interrupts():
            optimizer = make_optimizer(config, model, dht, batch_size=batch_size,
                                       client_mode=client_mode, private_key=private_key,
                                       upload_mbps=options.upload_mbps)
        if resumed is not None and resumed.optimizer_state is not None:
            problem = optimizer_state_mismatch(optimizer.state_dict(), resumed.optimizer_state)
            if problem is None:
                optimizer.load_state_dict(resumed.optimizer_state)
            else:
                # the weights are the valuable part; the optimizer state restarts (and on a run under
                # way comes from the swarm with its state below)
                logger.warning(f"{resumed.path}: {problem}; resuming its weights with a fresh optimizer state")
        swarm_epoch = max(optimizer.tracker.global_progress.epoch, published.initial_epoch)
        if swarm_epoch > optimizer.local_epoch:
            # the run is under way: start from the swarm's current model, not from scratch
            status["phase"] = "loading state"
            _write_status(options.status_file, status)
            logger.info(f"the swarm is at epoch {swarm_epoch}; downloading the current state from peers")
            if optimizer.load_state_from_peers():
                logger.info(f"loaded the state of epoch {optimizer.local_epoch}")
            status["loaded_state_epoch"] = optimizer.local_epoch

        reporter = PeerReporter(dht, config.run_id, signature_validator, role="trainer", device=str(device),
                                client_mode=client_mode, metrics_port=options.metrics_port)
        peer_seed = int.from_bytes(hashlib.sha256(dht.peer_id.to_bytes()).digest()[:8], "little")
        batches = peer_batches(corpus, config.data.num_shards, batch_size, peer_seed)
        mask_generator = torch.Generator().manual_seed(peer_seed)
        display = ProgressDisplay(config.target_batch_size, enabled=options.show_progress)
        status["heldout_loss"].append([optimizer.local_epoch, heldout_loss(model, heldout, config.model.kind)])
        if options.wait_for_peers > 1:
            status["phase"] = "waiting for peers"
            _write_status(options.status_file, status)
            _wait_for_peers(dht, config.run_id, partial(
                reporter.maybe_publish, step=0, epoch=optimizer.local_epoch, loss=None, samples_per_second=0.0,
                samples_accumulated=0, rounds=optimizer.rounds, traffic=optimizer.traffic,
            ), options.wait_for_peers, options.wait_for_peers_timeout)
            neighbourhood.refresh_now()  # now that they are all here: know them, not only the initial peers
        status["phase"] = "training"

        last_epoch, step, window_start, window_samples = optimizer.local_epoch, 0, time.perf_counter(), 0
        last_status_write = 0.0
        with display:
            while options.max_epochs is None or optimizer.local_epoch < options.max_epochs:
                raise_if_stop_requested()
                batch = next(batches).to(device)
                try:
                    with precision.autocast():
                        loss = compute_loss(model, batch, config.model.kind, mask_generator)
                    if not torch.isfinite(loss):
                        # never hand a non-finite gradient to the swarm: skip this batch
                        logger.warning(f"non-finite loss at step {step}; batch skipped")
                        optimizer.zero_grad()
                        continue
                    (privacy_head.add_penalty(loss) if privacy_head is not None else loss).backward()
                except Exception as error:
                    if device.type != "cuda" or not is_out_of_memory(error):
                        raise
                    # another program took GPU memory: this micro-batch's partial gradient goes, the
                    # accumulated ones stay (hivemind keeps them in its own buffers)
                    optimizer.zero_grad()
                    batch_size = halved_after_out_of_memory(batch_size)
                    optimizer.batch_size_per_step = batch_size
                    batches = peer_batches(corpus, config.data.num_shards, batch_size, peer_seed)
                    status["batch_size"] = batch_size
                    continue
                if config.optimizer.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
                step += 1
                window_samples += batch_size
                now = time.perf_counter()
                if now - window_start > 5.0:
                    status["samples_per_second"] = window_samples / (now - window_start)
                    window_start, window_samples = now, 0
                status.update(step=step, epoch=optimizer.local_epoch, loss=float(loss.item()))

                if optimizer.local_epoch != last_epoch:
                    _resync_if_apart(optimizer, status, model, options.checkpoint_dir)
                    status["rounds"] = [asdict(record) for record in optimizer.rounds]
                    status["traffic"] = {k: v for k, v in optimizer.traffic.items() if k != "rejected_peers"}
                    epoch = optimizer.local_epoch
                    # what this peer holds at the start of each epoch: tools compare peers with it
                    fingerprints = status.setdefault("fingerprints", {})
                    fingerprints[str(epoch)] = optimizer.parameter_fingerprint()[:8]
                    for old in list(fingerprints)[:-64]:
                        del fingerprints[old]
                    if options.eval_every and epoch % options.eval_every == 0:
                        status["heldout_loss"].append([epoch, heldout_loss(model, heldout, config.model.kind)])
                    if options.checkpoint_dir and options.checkpoint_every and epoch % options.checkpoint_every == 0:
                        _save(options.checkpoint_dir, model, optimizer, config)
                    last_epoch = epoch

                progress = optimizer.tracker.global_progress
                last_round = optimizer.rounds[-1] if optimizer.rounds else None
                display.update(step=step, epoch=optimizer.local_epoch, loss=status["loss"],
                               samples=progress.samples_accumulated, eta=progress.eta_next_epoch - time.time(),
                               peers=progress.num_peers, last_round=last_round,
                               samples_per_second=status["samples_per_second"])
                neighbourhood.maybe_refresh()
                reporter.maybe_publish(
                    step=step, epoch=optimizer.local_epoch, loss=status["loss"],
                    samples_per_second=status["samples_per_second"],
                    samples_accumulated=optimizer.tracker.local_progress.samples_accumulated,
                    rounds=optimizer.rounds, traffic=optimizer.traffic,
                    leakage=privacy_head.last_leakage if privacy_head is not None else None,
                )
                if now - last_status_write > 0.5:
                    _write_status(options.status_file, status)
                    last_status_write = now
        if options.max_epochs is not None:
            _resync_if_apart(optimizer, status)
            _linger_until_swarm_finishes(optimizer, config, options.max_epochs)
        status["phase"] = "finished"
    except StopRequested as stop:
        logger.info(f"{stop.args[0]} received: saving and leaving the swarm")
        status["phase"] = "stopped"
    finally:
        # runs on success, on a stop signal and on errors: the state is what the user must not lose
        try:
            if optimizer is not None:
                status["rounds"] = [asdict(record) for record in optimizer.rounds]
                status["epoch"] = optimizer.local_epoch
                if model is not None:
                    status["heldout_loss"].append([optimizer.local_epoch, heldout_loss(model, heldout, config.model.kind)])
                    if options.checkpoint_dir:
                        path = _save(options.checkpoint_dir, model, optimizer, config)
                        status["checkpoint"] = str(path)
                        logger.info(f"state saved to {path}")
                _write_status(options.status_file, status)
                if reporter is not None:
                    reporter.close()
                try:
                    optimizer.shutdown()
                except Exception as error:  # the state is saved; a hivemind hiccup on the way out is not the user's problem
                    logger.debug(f"optimizer shutdown: {error!r}")
        finally:
            if dht is not None:
                dht.shutdown()
    return status


def _checkpoint_to_resume(directory: Optional[str], config, model):
    """This peer's newest checkpoint, if it belongs to this run and fits its model; None otherwise,
    with one warning line saying why. A checkpoint that does not fit is left on disk untouched."""
    if not directory or latest_checkpoint_path(directory) is None:
        return None
    try:
        checkpoint = load_checkpoint(directory)
    except Exception as error:  # unreadable: say so and start without it rather than not at all
        logger.warning(f"cannot read the checkpoint in {directory} ({error}); starting without it")
        return None
    saved_run = checkpoint.meta.get("run_id")
    if saved_run is not None and saved_run != config.run_id:
        problem = f"it is of run {saved_run!r}, not {config.run_id!r}"
    else:
        problem = model_state_mismatch(model.state_dict(), checkpoint.model_state)
    if problem is not None:
        logger.warning(f"not resuming from {checkpoint.path}: {problem}. It stays on disk; this peer starts "
                       f"afresh, from the swarm's state when the run is under way (use another --checkpoint-dir "
                       f"to keep the two apart)")
        return None
    return checkpoint


def _wait_for_peers(dht, run_id: str, publish, wanted: int, timeout: float, poll_seconds: float = 0.5) -> int:
    """Hold the first step until ``wanted`` trainers (this one included) have a record in the run.
    Peers started together finish their set-up seconds apart; on a run whose epoch takes a second,
    the first one would otherwise run epochs alone, and the others would spend their first minute
    catching up through state downloads. After ``timeout`` it trains with whoever is there.

    (hivemind's progress records would be the obvious count, but a tracker publishes nothing before
    its peer's first sample: every waiting peer would wait for the others forever.)"""
    from swarmtrain.monitoring import fetch_records

    deadline, announced = time.monotonic() + timeout, None
    publish(force=True)
    while True:
        present = sum(1 for record in fetch_records(dht, run_id, max_age=RECORD_TTL).values()
                      if record.role == "trainer")
        if present >= wanted:
            if announced is not None:
                logger.info(f"{present} peers here: training")
            return present
        if time.monotonic() > deadline:
            logger.warning(f"only {present} of {wanted} peers after {timeout:.0f} s of waiting: training with them")
            return present
        if present != announced:
            logger.info(f"waiting for peers before the first step: {present} of {wanted} here (Ctrl+C to leave)")
            announced = present
        raise_if_stop_requested()
        time.sleep(poll_seconds)
        publish(force=False)  # keep this peer's record fresh for the others' count (it lives RECORD_TTL)


def _resync_if_apart(optimizer, status: dict, model=None, checkpoint_dir: Optional[str] = None) -> None:
    """A peer whose averaging round failed stepped on its own gradients, and one whose parameter
    fingerprint differed from its group's had drifted before; in sync mode nothing would ever
    bring either back. Download the swarm's state instead. A peer whose parameters went
    non-finite does the same (or, alone, goes back to its last checkpoint)."""
    last = optimizer.rounds[-1] if optimizer.rounds else None
    if not optimizer.state_is_finite():
        reason = "its parameters or optimizer statistics are not finite"
    elif last is None or status.get("resynced_after") == len(optimizer.rounds):
        return
    elif last.ok and optimizer.diverged:
        reason = "its parameters differ from the rest of its group"
    elif not last.ok and last.note != NO_OTHER_PEERS and getattr(optimizer, "resync_after_failed_round", True):
        reason = f"its averaging round failed ({last.note})"
    else:
        return
    status["resynced_after"] = len(optimizer.rounds)
    if optimizer.tracker.global_progress.num_peers <= 1:
        if reason.startswith("its parameters or") and checkpoint_dir and latest_checkpoint_path(checkpoint_dir):
            restored = load_checkpoint(checkpoint_dir)
            logger.error(f"{reason}, and no peer to download from: back to {restored.path}")
            optimizer.restore_checkpoint(model, restored.model_state, restored.optimizer_state)
            status["restores"] = status.get("restores", 0) + 1
        return
    logger.warning(f"epoch {last.epoch if last else optimizer.local_epoch}: {reason}; downloading the swarm's state")
    optimizer.load_state_from_peers()
    optimizer.resynchronised()
    status["resyncs"] = status.get("resyncs", 0) + 1


def _linger_until_swarm_finishes(optimizer, config, final_epoch: int) -> None:
    """At a planned end (--max-epochs), stay a little while others are still on their last epoch:
    a straggler whose last round failed re-synchronises by downloading the state from us."""
    deadline = time.monotonic() + config.averaging.averaging_timeout + 30
    me = optimizer.dht.peer_id.to_bytes()
    while time.monotonic() < deadline:
        raise_if_stop_requested()
        # (not our own record: a lone peer waited for it to age out when its last report lagged)
        behind = [r for r in progress_records(optimizer.dht, config.run_id, max_age=15.0)
                  if r.epoch < final_epoch and r.peer_id != me]
        if not behind:
            return
        time.sleep(1.0)


def _save(directory: str, model: torch.nn.Module, optimizer, config) -> Path:
    return save_checkpoint(
        directory,
        optimizer.local_epoch,
        model.state_dict(),
        optimizer.state_dict(),
        meta={"run_id": config.run_id, "version": __version__},
    )
