"""``make_optimizer``: the swarm optimizer of a run, for either averaging mode, from its config."""
from __future__ import annotations

from typing import Optional

import hivemind
import torch
from hivemind.compression import NoCompression
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from swarmtrain.access.bans import BanList

from swarmtrain.averaging.local import (ANCHOR_TOLERANCE_LR, InStepWeightMixin,
                                        LocalSwarmOptimizer)
from swarmtrain.averaging.schedule import ControllerSettings
from swarmtrain.averaging.sync import GroupRegistrationMixin, SwarmOptimizer
from swarmtrain.compression.factory import make_averager_factory
from swarmtrain.compression.feedback import DensitySchedule
from swarmtrain.compression.robust import RobustPolicy
from swarmtrain.config import RunConfig
from swarmtrain.training.optimizers import make_scheduler_factory, make_torch_optimizer_factory

DEFAULT_UPLOAD_MBPS = 100.0


def make_optimizer(config: RunConfig, model: torch.nn.Module, dht: hivemind.DHT, *, batch_size: int,
                   client_mode: bool, private_key: RSAPrivateKey, access=None,
                   upload_mbps: Optional[float] = None) -> SwarmOptimizer:
    """The swarm optimizer of `model` for the run: a SwarmOptimizer (``averaging.mode: sync``) or a
    LocalSwarmOptimizer (``mode: local``).

    :param dht: this peer's DHT
    :param batch_size: samples per local step (what the peer reports to the swarm's progress)
    :param client_mode: the peer cannot be dialled: it sends its part but reduces nothing
    :param private_key: this peer's identity key (signs its progress records)
    :param access: on a token-gated run, this node's LocalAccess (its averagers refuse peers without a
      valid token); None on an open run
    :param upload_mbps: this peer's uplink (sync mode: hivemind's load balancing gives a slow link a
      smaller share of the reduction); None: DEFAULT_UPLOAD_MBPS
    """
    averaging = config.averaging
    common = dict(
        dht=dht, run_id=config.run_id, target_batch_size=config.target_batch_size, batch_size_per_step=batch_size,
        optimizer=make_torch_optimizer_factory(config.optimizer), params=model.parameters(),
        scheduler=make_scheduler_factory(config.optimizer), matchmaking_time=averaging.matchmaking_time,
        averaging_timeout=averaging.averaging_timeout, access=access,
        # parameters are averaged in full precision when they are: fp16 would make peers differ
        state_averaging_compression=NoCompression(), load_state_compression=NoCompression(),
        tracker_opts=dict(private_key=private_key, min_refresh_period=0.5, default_refresh_period=1.0),
        client_mode=client_mode,
        # per averager process (gradients, state): the whole peer must be out within ~10 s of Ctrl+C
        shutdown_timeout=3.0, verbose=False,
    )
    density_schedule = DensitySchedule.for_spec(averaging.compression, dense_warmup_epochs=averaging.dense_warmup_epochs,
                                                density_warmup_epochs=averaging.density_warmup_epochs)
    robust_policy = RobustPolicy(aggregation=averaging.aggregation, max_norm_ratio=averaging.max_norm_ratio)
    # peers caught lying in a round's check are refused; bans are published under this peer's signed
    # subkey, and on a token-gated run the organiser's revocations count alone (access/bans.py)
    ban_list = BanList(dht, config.run_id, owner_subkey=RSASignatureValidator(private_key).local_public_key,
                       authority_id=access.authority_id if access is not None else None)
    if averaging.mode == "local":  # local steps + averaging of model deltas: averaging/local.py
        tolerance = ANCHOR_TOLERANCE_LR * config.optimizer.lr
        delta_averager_factory = make_averager_factory(
            averaging.compression, density_schedule=density_schedule, access=access, mixin=InStepWeightMixin,
            anchor_tolerance=tolerance, request_timeout=averaging.request_timeout,
            robust_policy=robust_policy, ban_list=ban_list)
        return LocalSwarmOptimizer(
            settings=ControllerSettings.from_config(config), delta_averager_factory=delta_averager_factory,
            outer_lr=averaging.outer_lr, outer_momentum=averaging.outer_momentum,
            feedback_decay=averaging.feedback_decay, anchor_tolerance=tolerance,
            background_rounds=averaging.overlap,
            averager_opts=dict(request_timeout=averaging.request_timeout), fingerprint_tolerance=tolerance, **common)
    # hivemind's load balancing gives each peer a span of the reduction in proportion to this; every
    # peer reports one (a peer reporting none counts as its group's average), so the default is a
    # plain assumption, and a volunteer's --max-upload-mbps below it means less upload for them
    bandwidth = float(upload_mbps) if upload_mbps is not None else DEFAULT_UPLOAD_MBPS
    # the factory carries the codec (dense or sparse) and the options hivemind does not forward
    grad_averager_factory = make_averager_factory(
        averaging.compression, density_schedule=density_schedule, access=access,
        mixin=GroupRegistrationMixin if averaging.overlap else None,
        request_timeout=averaging.request_timeout, robust_policy=robust_policy, bandwidth=bandwidth,
        ban_list=ban_list)
    # overlap: hivemind's delayed parameter updates (the round and the step in a background thread;
    # they need the optimizer offloaded to its own copy of the parameters, and a state averaging
    # round after a delayed step must be delayed too)
    overlap = averaging.overlap
    return SwarmOptimizer(
        grad_averager_factory=grad_averager_factory, average_state_every=averaging.state_averaging_every or 10**9,
        offload_optimizer=True, delay_optimizer_step=overlap, delay_grad_averaging=overlap,
        delay_state_averaging=overlap, averager_opts=dict(request_timeout=averaging.request_timeout, bandwidth=bandwidth),
        # a stale step moves parameters by about the learning rate (Adam, LAMB); float rounding
        # between peers in sync is orders of magnitude below this
        fingerprint_tolerance=0.05 * config.optimizer.lr, **common)
