"""hivemind.Optimizer configured from the run config, plus a record of every averaging round."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import List, Optional

import hivemind
import torch
import transformers
from hivemind.compression import NoCompression
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarmtrain.compression.averager import make_grad_averager_factory
from swarmtrain.compression.feedback import DensitySchedule
from swarmtrain.compression.spec import parse_compression_spec
from swarmtrain.config import OptimizerConfig, RunConfig


def make_torch_optimizer_factory(config: OptimizerConfig):
    """LAMB (the DeDLOC/sahajBERT choice) or AdamW; bitsandbytes 8-bit state when asked."""

    def create(params):
        common = dict(lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay)
        if config.name == "lamb" or config.eight_bit:
            import bitsandbytes as bnb  # imported only when used: its import is slow and chatty

            cls = {
                ("lamb", False): bnb.optim.LAMB,
                ("lamb", True): bnb.optim.LAMB8bit,
                ("adamw", True): bnb.optim.AdamW8bit,
            }[config.name, config.eight_bit]
            return cls(params, **common)
        return torch.optim.AdamW(params, **common)

    return create


def make_scheduler_factory(config: OptimizerConfig):
    # hivemind steps the scheduler once per global epoch, so warm-up and decay count epochs
    return partial(
        transformers.get_linear_schedule_with_warmup,
        num_warmup_steps=config.warmup_epochs,
        num_training_steps=config.total_epochs,
    )


@dataclass
class RoundRecord:
    epoch: int
    group_size: int  # 0 when the round failed or was skipped
    ok: bool
    seconds: float
    note: str = ""


class _ProgressTrackerWithBlockingGoodbye(ProgressTracker):
    """hivemind's tracker drops the future of its goodbye record on shutdown; when that future is
    garbage-collected before the DHT process reads the request, the DHT process logs a traceback
    and stalls its own shutdown. Same goodbye, but we wait for it."""

    def shutdown(self, timeout: Optional[float] = None):
        self.shutdown_triggered.set()
        self.should_report_progress.set()
        self.global_state_updated.set()
        self.shutdown_complete.wait(timeout)
        try:
            self.dht.store(self.training_progress_key, subkey=self._local_public_key, value=None,
                           expiration_time=get_dht_time() + self.metadata_expiration)
        except Exception:
            pass  # the DHT is already gone: nobody to say goodbye to


class SwarmOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer that remembers how each gradient averaging round went.

    hivemind only logs the group size; the progress display, the demo summary and the tests need
    it as data. The override wraps the one method that sees the round's outcome (hivemind is
    pinned, so this private seam is stable)."""

    def __init__(self, *args, **kwargs):
        self.rounds: List[RoundRecord] = []
        self.diverged = False  # set when the last round showed our parameters differ from the group's
        self._fingerprint_cooldown = 0
        super().__init__(*args, **kwargs)
        # every gradient round also gathers each member's parameter fingerprint (a few bytes), so a
        # peer that drifted -- it stepped alone before the others found it, or its group split --
        # learns it from the very next round instead of training on apart for ever
        schedule_step = self.grad_averager.schedule_step

        def schedule_step_with_fingerprint(*args, **kwargs):
            kwargs.setdefault("gather", [self.local_epoch, self.parameter_fingerprint()])
            return schedule_step(*args, **kwargs)

        self.grad_averager.schedule_step = schedule_step_with_fingerprint

    def parameter_fingerprint(self) -> float:
        """Sums (float64) of the values and of their squares over every parameter the optimizer
        steps: equal on peers with equal parameters, different in practice otherwise. One pass over
        the parameters per epoch: small next to an epoch's compute."""
        with torch.no_grad():
            params = [p for group in self.state_averager.optimizer.param_groups for p in group["params"]]
            return float(sum(p.detach().double().sum() + p.detach().double().square().sum() for p in params))

    def _check_fingerprints(self, group: dict) -> None:
        mine = group.get(self.dht.peer_id)
        if not isinstance(mine, (list, tuple)) or len(mine) != 2:
            return
        if self._fingerprint_cooldown > 0:
            # the next pre-scheduled round may still carry the fingerprint from before a resync
            self._fingerprint_cooldown -= 1
            return
        # every member applies the same average, so all should hold the same parameters, whatever
        # epoch number each believes it is at (hivemind's catch-up can leave a joiner's label off
        # by one). Act on a strict majority only, so two halves of a split group never both
        # download each other's state.
        members = [data[1] for data in group.values() if isinstance(data, (list, tuple)) and len(data) == 2]
        fingerprint, count = Counter(members).most_common(1)[0]
        self.diverged = 2 * count > len(members) and mine[1] != fingerprint

    def resynchronised(self) -> None:
        self.diverged = False
        self._fingerprint_cooldown = 2

    @property
    def traffic(self) -> dict:
        """What the gradient averager measured (shared memory, written by its process): bytes sent
        and received from the serialized messages, the density sent, selection time..."""
        return self.grad_averager.stats.snapshot()

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> ProgressTracker:
        return _ProgressTrackerWithBlockingGoodbye(
            dht=self.dht, prefix=self.run_id, target_batch_size=target_batch_size, client_mode=self.client_mode,
            status_loglevel=self.status_loglevel, start=True, **kwargs,
        )

    def _update_global_epoch(self, grad_scaler) -> None:
        epoch, recorded = self.local_epoch, len(self.rounds)
        super()._update_global_epoch(grad_scaler)
        if self.grad_averager is not None and len(self.rounds) == recorded:
            # hivemind stepped without calling the method below: alone, or a round that never started
            alone = self.tracker.global_progress.num_peers <= 1
            self.rounds.append(RoundRecord(epoch, 0, False, 0.0, "no other peers" if alone else
                                           "no round started; stepped on local gradients"))

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control):
        started = time.perf_counter()
        epoch = self.local_epoch
        super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        seconds = time.perf_counter() - started
        if maybe_step_control is None:
            self.rounds.append(RoundRecord(epoch, 0, False, seconds, "no other peers"))
            return
        try:
            group = maybe_step_control.result(timeout=0)
            self.rounds.append(RoundRecord(epoch, len(group), True, seconds))
            self._check_fingerprints(group)
        except BaseException as error:  # the round failed; hivemind already fell back to local gradients
            self.rounds.append(RoundRecord(epoch, 0, False, seconds, repr(error)[:200]))


def make_optimizer(
    config: RunConfig,
    model: torch.nn.Module,
    dht: hivemind.DHT,
    *,
    batch_size: int,
    client_mode: bool,
    private_key: RSAPrivateKey,
) -> SwarmOptimizer:
    averaging = config.averaging
    spec = parse_compression_spec(averaging.compression)
    schedule = None
    if spec.is_sparse and averaging.density_warmup_epochs:
        schedule = DensitySchedule(spec.density, initial=max(spec.density, 1 / 64),
                                   warmup_epochs=averaging.density_warmup_epochs)
    # the factory carries the codec (dense or sparse) and the options hivemind does not forward
    grad_averager_factory = make_grad_averager_factory(spec, density_schedule=schedule,
                                                       request_timeout=averaging.request_timeout)

    return SwarmOptimizer(
        dht=dht,
        run_id=config.run_id,
        target_batch_size=config.target_batch_size,
        batch_size_per_step=batch_size,
        optimizer=make_torch_optimizer_factory(config.optimizer),
        params=model.parameters(),
        scheduler=make_scheduler_factory(config.optimizer),
        matchmaking_time=averaging.matchmaking_time,
        averaging_timeout=averaging.averaging_timeout,
        grad_averager_factory=grad_averager_factory,
        # parameters are averaged in full precision when they are: fp16 would make peers differ
        state_averaging_compression=NoCompression(),
        load_state_compression=NoCompression(),
        average_state_every=averaging.state_averaging_every or 10**9,
        delay_state_averaging=False,
        averager_opts=dict(request_timeout=averaging.request_timeout),
        tracker_opts=dict(private_key=private_key, min_refresh_period=0.5, default_refresh_period=1.0),
        client_mode=client_mode,
        verbose=False,
    )
