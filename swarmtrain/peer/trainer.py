"""The trainer role: a volunteer's peer that trains the run's model with the swarm.

``Trainer.run`` builds the training (tokenizer, model, data, batch size, optimizer), catches up with the swarm,
then loops: ``step`` (one local step), ``new_epoch`` (after each swarm epoch: re-synchronise if apart,
measure, checkpoint) and ``publish`` (the progress display, the DHT record, the status file).
``Trainer.close`` always runs: it saves what the volunteer must not lose.

The data is a stream (swarmtrain.data): the peer reads its share of the corpus's shards (its share
among the training peers it sees in the DHT), and its position in the stream goes into each checkpoint,
so a restarted peer continues where it was instead of reading the same blocks again.
"""
from __future__ import annotations

import hashlib
import logging
import multiprocessing
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from swarmtrain import __version__
from swarmtrain.averaging.factory import make_optimizer
from swarmtrain.averaging.rounds import reason_to_resync
from swarmtrain.data import TrainingData, open_training_data, resolve_tokenizer
from swarmtrain.data.transfer import fetch_tokenizer
from swarmtrain.errors import UserError
from swarmtrain.models import build_model, compute_loss, embedded_input_layer, heldout_loss, objective_of
from swarmtrain.monitoring.records import RECORD_TTL, fetch_records
from swarmtrain.monitoring.reporter import PeerReporter
from swarmtrain.monitoring.status import PeerStatus
from swarmtrain.net.dht import NeighbourhoodKeeper
from swarmtrain.net.join import JoinedSwarm
from swarmtrain.net.progress import progress_records
from swarmtrain.peer.display import ProgressDisplay
from swarmtrain.peer.options import PeerOptions
from swarmtrain.peer.resources import (Machine, halved_after_out_of_memory, is_out_of_memory, pick_batch_size,
                                      yield_to_communication)
from swarmtrain.peer.utilization import UtilizationMeter
from swarmtrain.phases import phase
from swarmtrain.privacy import attach_privacy_head
from swarmtrain.signals import (StopRequested, children_ignore_interrupts, finishing, poll, raise_if_stop_requested,
                                stop_repeated, stop_requested)
from swarmtrain.training.checkpoint import (CheckpointError, check_checkpoint_dir, checkpoint_paths,
                                            latest_checkpoint_path, load_checkpoint, model_state_mismatch,
                                            optimizer_state_mismatch, read_meta, save_checkpoint)

logger = logging.getLogger("swarmtrain.peer")
FINGERPRINTS_KEPT = 64  # epochs whose parameter fingerprint the status file keeps
STATUS_WRITE_PERIOD = 0.5  # seconds between status file writes while training
DATA_PEERS_PERIOD = 30.0  # seconds between updates of the training peers the shards are shared among


class Trainer:
    """The trainer role (see the module docstring).

    :param swarm: the run this peer joined
    :param options: the volunteer's flags
    :param status: this peer's status, written to --status-file as it changes
    :param machine: the device and precision resolved from the flags
    """

    def __init__(self, swarm: JoinedSwarm, options: PeerOptions, status: PeerStatus, machine: Machine):
        self.swarm, self.options, self.status, self.machine = swarm, options, status, machine
        if options.checkpoint_dir:  # refused now, in one line, rather than at the first save
            check_checkpoint_dir(options.checkpoint_dir)
        self.config = swarm.config
        self.device = machine.device
        self.data: Optional[TrainingData] = None
        self.heldout = self.model = self.privacy_head = self.optimizer = self.reporter = None
        self.objective = objective_of(self.config.model)
        self._data_peers_at = 0.0
        self.batch_size = 0
        self.steps = 0
        self._window_start, self._window_samples = time.perf_counter(), 0
        self._last_epoch = 0
        self._rounds_seen = 0  # optimizer.rounds already judged by _resync_if_apart
        self._last_status_write = 0.0
        self.utilization = UtilizationMeter()

    # -------------------------------------------------------------- the role
    def run(self) -> None:
        logger.info(f"joined run {self.config.run_id!r} as {self.swarm.dht.peer_id} on {self.device}")
        self.neighbourhood = NeighbourhoodKeeper(self.swarm.dht, self.options.initial_peers)
        self.neighbourhood.refresh_now()  # meet the peers that started with us before the tracker looks
        self._build()
        self._catch_up_with_swarm()
        self._start_reporting()
        self._wait_for_peers()
        self.status.phase = "training"
        self._last_epoch = self.optimizer.local_epoch
        self.utilization.start()
        with self.display:
            while self.options.max_epochs is None or self.optimizer.local_epoch < self.options.max_epochs:
                raise_if_stop_requested()
                if not self.step():
                    continue
                if self.optimizer.local_epoch != self._last_epoch:
                    self.new_epoch()
                self.publish()
        if self.options.max_epochs is not None:
            self.optimizer.settle()  # the last round's update (overlap: still in flight) reaches the model
            self._resync_if_apart()
            self._linger_until_swarm_finishes(self.options.max_epochs)

    def close(self) -> bool:
        """Runs on success, on a stop signal and on errors: the state is what the user must not lose.
        (``_save_and_leave``; then the data's reader thread stops.)"""
        try:
            return self._save_and_leave()
        finally:
            if self.data is not None:
                self.data.close()

    def _save_and_leave(self) -> bool:
        """What ``close`` does.

        The checkpoint comes first, and a repeated stop signal waits for it (systemd gives a stopping
        service little time). The final held-out evaluation runs only at a planned end: on a CPU it
        can take minutes, which nobody stopping a peer wants to wait for. Then the hand-over to the
        swarm (the DHT record, the averagers); False when it was skipped: a second stop signal, or
        helper processes already ended by a signal to the whole process group."""
        optimizer, status = self.optimizer, self.status
        if optimizer is None:
            return True
        # overlap: the update in flight, if it lands soon; not waited for when stopping (the checkpoint
        # then holds the last applied step, one behind the swarm: the next round's check resyncs it)
        settle_timeout = 0.0 if stop_requested() else 5.0
        try:
            optimizer.settle(timeout=settle_timeout)
        except Exception as error:
            logger.debug(f"settling the delayed update: {error!r}")
        status.utilization = self.utilization.share()
        status.overlapped_steps = optimizer.overlapped_steps
        status.rounds = [asdict(record) for record in optimizer.rounds]
        status.epoch = optimizer.local_epoch
        if self.model is not None and self.options.checkpoint_dir:
            with finishing("writing the checkpoint"):
                path = self._save(settle_timeout=settle_timeout)
            if path is not None:
                status.checkpoint = str(path)
                logger.info(f"state saved to {path}")
        status.write(self.options.status_file)
        if self.model is not None and not stop_requested():
            try:
                status.heldout_loss.append([optimizer.local_epoch, self._heldout_loss()])
                status.write(self.options.status_file)
            except StopRequested:
                logger.info("held-out evaluation skipped: stopping")
        if stop_repeated() or not self._helpers_alive():
            return False
        try:
            if self.reporter is not None:
                self.reporter.close()
            optimizer.shutdown()
        except Exception as error:  # the state is saved; a hivemind hiccup on the way out is not the user's problem
            logger.debug(f"optimizer shutdown: {error!r}")
        return True

    def _helpers_alive(self) -> bool:
        """The DHT and averager processes are all running (SIGTERM to our process group, from systemd
        or `kill -- -PGID`, ends them with us; shutting down a dead one would wait for ever)."""
        helpers = [self.swarm.dht] + [getattr(self.optimizer, name, None)
                                      for name in ("state_averager", "grad_averager", "delta_averager")]
        return all(helper.is_alive() for helper in helpers if isinstance(helper, multiprocessing.process.BaseProcess))

    # -------------------------------------------------------------- set-up
    def _build(self) -> None:
        config, options = self.config, self.options
        # order matters: the tokenizer sizes the model, the checkpoint says where the data resumes
        tokenizer = self._resolve_tokenizer()
        self.model = build_model(config.model, config.data.seq_len, config.seed, tokenizer.vocabulary).to(self.device)
        try:
            self.privacy_head = attach_privacy_head(self.model, config.privacy,
                                                    input_layer=embedded_input_layer(self.model, config.model.kind))
        except (AttributeError, KeyError, ValueError) as error:
            raise UserError(f"privacy.cut_layer {config.privacy.cut_layer!r}: {error}") from None
        resumed = self._checkpoint_to_resume()
        if resumed is not None:
            self.model.load_state_dict(resumed.model_state)
            logger.info(f"resuming from {resumed.path} (epoch {resumed.epoch})")
        with phase("opening the corpus", logger):
            self.data = open_training_data(config.data, options.data, self.swarm.dht.peer_id.to_bytes(),
                                           start_position=resumed.meta.get("data_position") if resumed else None,
                                           tokenizer=tokenizer)
        self.status.data_position_at_start = self.data.position()
        logger.info(f"data: {self.data.description}")
        self.heldout = self.data.heldout.to(self.device)
        self.batch_size = self._pick_batch_size()
        interrupt_backward_on_stop(self.model)
        self.status.update(batch_size=self.batch_size, precision=self.machine.precision.name)
        if self.machine.precision.name != "fp32":
            logger.info(f"mixed precision: {self.machine.precision.name} autocast (weights, gradients and averaging "
                        "stay fp32)")
        with children_ignore_interrupts():
            self.optimizer = make_optimizer(config, self.model, self.swarm.dht, batch_size=self.batch_size,
                                            client_mode=self.swarm.client_mode, private_key=self.swarm.private_key,
                                            access=self.swarm.access, upload_mbps=options.upload_mbps)
        if config.averaging.overlap:
            yield_to_communication()  # rounds run while we compute: they must not wait for a core
        if resumed is not None and resumed.optimizer_state is not None:
            problem = optimizer_state_mismatch(self.optimizer.state_dict(), resumed.optimizer_state)
            if problem is None:
                self.optimizer.load_state_dict(resumed.optimizer_state)
            else:
                # the weights are the valuable part; the optimizer state restarts (and on a run under
                # way comes from the swarm with its state below)
                logger.warning(f"{resumed.path}: {problem}; resuming its weights with a fresh optimizer state")

    def _resolve_tokenizer(self):
        """The run's tokenizer: this machine's copy (refused in one line if it is not the run's), a
        cached one, or the one the coordinator publishes in the DHT (swarmtrain.data.transfer)."""
        dht, run_id = self.swarm.dht, self.config.run_id

        def from_the_swarm(sha256: str) -> bytes:
            with phase(f"fetching the run's tokenizer (sha256 {sha256[:16]}...) from the swarm", logger):
                content = fetch_tokenizer(dht, run_id, sha256)
            logger.info(f"got the run's tokenizer from the swarm ({len(content)} bytes)")
            return content

        return resolve_tokenizer(self.config.data, fetch=from_the_swarm)

    def _pick_batch_size(self) -> int:
        config, model, data = self.config, self.model, self.data
        probe_generator = torch.Generator().manual_seed(0)

        def probe_loss(batch_size: int) -> torch.Tensor:
            with self.machine.precision.autocast():
                batch = data.probe_batch(batch_size).to(self.device)  # (not taken from the stream)
                return compute_loss(model, batch, self.objective, probe_generator, data.vocabulary)

        if self.options.batch_size is not None:
            return self.options.batch_size
        with phase("probing memory for --batch-size auto", logger):
            batch_size = pick_batch_size(None, self.options.max_memory, model, probe_loss, self.device,
                                         eight_bit=config.optimizer.eight_bit,
                                         target_batch_size=min(config.target_batch_size,
                                                               data.estimated_blocks or config.target_batch_size))
        probed = self.options.max_memory is not None or self.device.type == "cuda"
        how = "the largest that fits the memory budget" if probed else "the CPU default; --max-memory sizes it"
        logger.info(f"--batch-size auto: {batch_size} samples per local step ({how})")
        return batch_size

    def _checkpoint_to_resume(self):
        """This peer's newest intact checkpoint that belongs to this run and fits its model; None if there is
        none. A damaged one (its files do not match the hashes in its meta.json), another run's or another
        model's is skipped with one line saying why, and left on disk untouched: the next one is tried."""
        directory = self.options.checkpoint_dir
        if not directory:
            return None
        for path in checkpoint_paths(directory):
            try:
                saved_run = read_meta(path).get("run_id")
                if saved_run is not None and saved_run != self.config.run_id:
                    logger.info(f"{path} is of run {saved_run!r}, not {self.config.run_id!r}: left alone")
                    continue
                checkpoint = load_checkpoint(path)
            except CheckpointError as error:
                logger.warning(f"{path} is damaged: {error}. It stays on disk; trying an older checkpoint")
                continue
            problem = model_state_mismatch(self.model.state_dict(), checkpoint.model_state)
            if problem is None:
                return checkpoint
            logger.warning(f"not resuming from {checkpoint.path}: {problem}. It stays on disk (use another "
                           f"--checkpoint-dir to keep the two apart); trying an older checkpoint")
        return None

    def _catch_up_with_swarm(self) -> None:
        optimizer = self.optimizer
        swarm_epoch = max(optimizer.tracker.global_progress.epoch, self.swarm.published.initial_epoch)
        if swarm_epoch <= optimizer.local_epoch:
            return
        # the run is under way: start from the swarm's current model, not from scratch
        self.status.phase = "loading state"
        self.status.write(self.options.status_file)
        logger.info(f"the swarm is at epoch {swarm_epoch}; downloading the current state from peers")
        with phase("downloading the state", logger):
            loaded = optimizer.load_state_from_peers()
        if loaded:
            logger.info(f"loaded the state of epoch {optimizer.local_epoch}")
        self.status.loaded_state_epoch = optimizer.local_epoch

    def _start_reporting(self) -> None:
        dht = self.swarm.dht
        self.reporter = PeerReporter(dht, self.config.run_id, self.swarm.signature_validator, role="trainer",
                                     device=str(self.device), client_mode=self.swarm.client_mode,
                                     metrics_port=self.options.metrics_port)
        self.peer_seed = int.from_bytes(hashlib.sha256(dht.peer_id.to_bytes()).digest()[:8], "little")
        self.batches = self.data.batches(self.batch_size)
        self.mask_generator = torch.Generator().manual_seed(self.peer_seed)
        self.display = ProgressDisplay(self.config.target_batch_size, enabled=self.options.show_progress)
        self.status.heldout_loss.append([self.optimizer.local_epoch, self._heldout_loss()])

    def _wait_for_peers(self) -> None:
        """Hold the first step until ``--wait-for-peers`` trainers (this one included) have a record in
        the run. Peers started together finish their set-up seconds apart; on a run whose epoch takes
        a second, the first one would otherwise run epochs alone, and the others would spend their
        first minute catching up through state downloads. After ``--wait-timeout`` it trains with
        whoever is there.

        (hivemind's progress records would be the obvious count, but a tracker publishes nothing
        before its peer's first sample: every waiting peer would wait for the others forever.)"""
        wanted = self.options.wait_for_peers
        if wanted <= 1:
            return
        self.status.phase = "waiting for peers"
        self.status.write(self.options.status_file)
        publish = partial(self.reporter.maybe_publish, step=0, epoch=self.optimizer.local_epoch, loss=None,
                          samples_per_second=0.0, samples_accumulated=0, rounds=self.optimizer.rounds,
                          traffic=self.optimizer.traffic)
        publish(force=True)
        announced = []

        def enough_peers() -> Optional[int]:
            present = sum(1 for record in fetch_records(self.swarm.dht, self.config.run_id, max_age=RECORD_TTL).values()
                          if record.role == "trainer")
            if present >= wanted:
                return present
            if present not in announced:
                logger.info(f"waiting for peers before the first step: {present} of {wanted} here (Ctrl+C to leave)")
                announced.append(present)
            publish(force=False)  # keep this peer's record fresh for the others' count (it lives RECORD_TTL)
            return None

        present = poll(enough_peers, timeout=self.options.wait_for_peers_timeout, interval=0.5)
        if present is None:
            logger.warning(f"only {announced[-1] if announced else 0} of {wanted} peers after "
                           f"{self.options.wait_for_peers_timeout:.0f} s of waiting: training with them")
        elif announced:
            logger.info(f"{present} peers here: training")
        self.neighbourhood.refresh_now()  # now that they are all here: know them, not only the initial peers
        self._share_shards_with_peers()

    # -------------------------------------------------------------- the loop
    def step(self) -> bool:
        """One local step (forward, backward, the swarm optimizer's step); False when the batch was skipped."""
        optimizer = self.optimizer
        batch = next(self.batches).to(self.device)
        started = time.perf_counter()
        try:
            with self.machine.precision.autocast():
                loss = compute_loss(self.model, batch, self.objective, self.mask_generator, self.data.vocabulary)
            if not torch.isfinite(loss):
                # never hand a non-finite gradient to the swarm: skip this batch
                logger.warning(f"non-finite loss at step {self.steps}; batch skipped")
                optimizer.zero_grad()
                return False
            (self.privacy_head.add_penalty(loss) if self.privacy_head is not None else loss).backward()
        except Exception as error:
            if self.device.type != "cuda" or not is_out_of_memory(error):
                raise
            # another program took GPU memory: this micro-batch's partial gradient goes, the
            # accumulated ones stay (hivemind keeps them in its own buffers)
            optimizer.zero_grad()
            self.batch_size = halved_after_out_of_memory(self.batch_size)
            optimizer.batch_size_per_step = self.batch_size
            self.batches = self.data.batches(self.batch_size)  # (goes on from the same place in the stream)
            self.status.batch_size = self.batch_size
            return False
        if self.config.optimizer.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optimizer.max_grad_norm)
        computed, epoch = time.perf_counter() - started, optimizer.local_epoch
        started = time.perf_counter()
        optimizer.step()
        if optimizer.local_epoch == epoch:  # a local step; one that moved to a new epoch was the swarm's
            computed += time.perf_counter() - started
        self.utilization.add_computing(computed)
        optimizer.zero_grad()
        self.steps += 1
        self._window_samples += self.batch_size
        now = time.perf_counter()
        if now - self._window_start > 5.0:
            self.status.samples_per_second = self._window_samples / (now - self._window_start)
            self._window_start, self._window_samples = now, 0
        self.status.update(step=self.steps, epoch=optimizer.local_epoch, loss=float(loss.item()))
        return True

    def new_epoch(self) -> None:
        """After each swarm epoch: re-synchronise if apart, record the rounds, measure, checkpoint."""
        optimizer, options, status = self.optimizer, self.options, self.status
        self._resync_if_apart()
        status.rounds = [asdict(record) for record in optimizer.rounds]
        status.traffic = optimizer.traffic.to_dict()
        epoch = optimizer.local_epoch
        # what this peer holds at the start of each epoch: tools compare peers with it
        fingerprints = status.fingerprints if status.fingerprints is not None else {}
        settled = optimizer.epoch_start_fingerprint()  # overlap: the previous epoch's (this one's is in flight)
        if settled is not None:
            fingerprints[str(settled[0])] = settled[1][:8]
        for old in list(fingerprints)[:-FINGERPRINTS_KEPT]:
            del fingerprints[old]
        status.fingerprints = fingerprints
        if options.eval_every and epoch % options.eval_every == 0:
            status.heldout_loss.append([epoch, self._heldout_loss()])
        if options.checkpoint_dir and options.checkpoint_every and epoch % options.checkpoint_every == 0:
            with finishing("writing the checkpoint"):
                self._save()
        self._last_epoch = epoch

    def publish(self) -> None:
        """The progress display, this peer's record in the DHT, and (at most every STATUS_WRITE_PERIOD)
        the status file."""
        optimizer, status = self.optimizer, self.status
        progress = optimizer.tracker.global_progress
        last_round = optimizer.rounds[-1] if optimizer.rounds else None
        self.display.update(step=self.steps, epoch=optimizer.local_epoch, loss=status.loss,
                            samples=progress.samples_accumulated, eta=progress.eta_next_epoch - time.time(),
                            peers=progress.num_peers, last_round=last_round,
                            samples_per_second=status.samples_per_second)
        self.neighbourhood.maybe_refresh()
        if time.monotonic() - self._data_peers_at > DATA_PEERS_PERIOD:
            self._share_shards_with_peers()
        status.update(utilization=self.utilization.share(), overlapped_steps=optimizer.overlapped_steps)
        self.reporter.maybe_publish(
            step=self.steps, epoch=optimizer.local_epoch, loss=status.loss,
            samples_per_second=status.samples_per_second,
            samples_accumulated=optimizer.tracker.local_progress.samples_accumulated,
            rounds=optimizer.rounds, traffic=optimizer.traffic,
            leakage=self.privacy_head.last_leakage if self.privacy_head is not None else None,
            utilization=status.utilization,
        )
        now = time.perf_counter()
        if now - self._last_status_write > STATUS_WRITE_PERIOD:
            status.write(self.options.status_file)
            self._last_status_write = now

    def _share_shards_with_peers(self) -> None:
        """Read only this peer's share of the shards among the training peers in the DHT now (their
        progress records): disjoint from theirs; a peer joining takes a little from everyone."""
        self._data_peers_at = time.monotonic()
        peers = [record.peer_id for record in progress_records(self.swarm.dht, self.config.run_id, max_age=RECORD_TTL)]
        self.data.set_peers(peers)

    # -------------------------------------------------------------- staying with the swarm
    def _resync_if_apart(self) -> None:
        """A peer whose averaging round failed stepped on its own gradients, and one whose parameter
        fingerprint differed from its group's had drifted before; in sync mode nothing would ever
        bring either back. Download the swarm's state instead. A peer whose parameters went
        non-finite does the same (or, alone, goes back to its last checkpoint)."""
        optimizer, status = self.optimizer, self.status
        unseen, self._rounds_seen = optimizer.rounds[self._rounds_seen:], len(optimizer.rounds)
        if not optimizer.state_is_finite():
            reason = "its parameters or optimizer statistics are not finite"
        else:  # (rounds seen before a resync are not judged again: it set _rounds_seen)
            reason = reason_to_resync(unseen, optimizer.diverged,
                                      failed_rounds_count=getattr(optimizer, "resync_after_failed_round", True))
            if reason is None:
                return
        status.resynced_after = len(optimizer.rounds)
        if optimizer.tracker.global_progress.num_peers <= 1:
            checkpoint_dir = self.options.checkpoint_dir
            newest = latest_checkpoint_path(checkpoint_dir, self.config.run_id) if checkpoint_dir else None
            if reason.startswith("its parameters or") and newest is not None:
                restored = load_checkpoint(newest)
                logger.error(f"{reason}, and no peer to download from: back to {restored.path}")
                optimizer.restore_checkpoint(self.model, restored.model_state, restored.optimizer_state)
                status.restores = (status.restores or 0) + 1
            return
        logger.warning(f"epoch {optimizer.local_epoch}: {reason}; downloading the swarm's state")
        optimizer.load_state_from_peers()
        optimizer.resynchronised()
        status.resyncs = (status.resyncs or 0) + 1

    def _linger_until_swarm_finishes(self, final_epoch: int) -> None:
        """At a planned end (--max-epochs), stay a little while others are still on their last epoch:
        a straggler whose last round failed re-synchronises by downloading the state from us."""
        dht, me = self.swarm.dht, self.swarm.dht.peer_id.to_bytes()

        def nobody_behind() -> Optional[bool]:
            # (not our own record: a lone peer waited for it to age out when its last report lagged)
            behind = [r for r in progress_records(dht, self.config.run_id, max_age=15.0)
                      if r.epoch < final_epoch and r.peer_id != me]
            return True if not behind else None

        poll(nobody_behind, timeout=self.config.averaging.averaging_timeout + 30, interval=1.0)

    # -------------------------------------------------------------- measurements and state
    def _heldout_loss(self) -> float:
        with phase("evaluating the held-out loss", logger):
            return heldout_loss(self.model, self.heldout, self.objective, vocabulary=self.data.vocabulary)

    def _save(self, settle_timeout: Optional[float] = None) -> Optional[Path]:
        """Save a checkpoint; None (one error line, training goes on) when the disk refuses it -- full, or
        the directory went away since the start-up check. Overlap: the update in flight lands first (up
        to `settle_timeout`, None: the averaging timeout), and no background step runs while saving."""
        self.optimizer.settle(settle_timeout)
        try:
            with self.optimizer.no_step_running():
                return save_checkpoint(self.options.checkpoint_dir, self.optimizer.local_epoch,
                                       self.model.state_dict(), self.optimizer.state_dict(),
                                       meta={"run_id": self.config.run_id, "version": __version__,
                                             "data_position": self.data.position()})
        except OSError as error:
            logger.error(f"could not save a checkpoint to {self.options.checkpoint_dir}: "
                         f"{error.strerror or error}; the previous ones are untouched")
            return None


def _check_for_stop(_gradient) -> None:
    raise_if_stop_requested()


def interrupt_backward_on_stop(model: torch.nn.Module) -> None:
    """Let a stop signal end a backward pass midway instead of after it.

    Python runs a signal handler only between bytecodes, and a backward pass is one long C++ call:
    on a CPU, a big model's step kept Ctrl+C waiting for most of a minute. A tensor hook is Python
    code run by the autograd engine on this thread, so one on the output of every module that has
    parameters lets the handler's StopRequested out (autograd passes it through unchanged) as soon
    as the gradient reaches that module. Nothing is lost: the half-computed gradients are never
    applied, and the checkpoint holds the parameters of the last completed step."""

    def hook_output(_module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(_check_for_stop)

    for module in model.modules():
        if next(module.parameters(recurse=False), None) is not None:
            module.register_forward_hook(hook_output)
