"""A peer that sees no other peer pre-schedules no gradient round (swarmtrain.averaging.sync.SwarmOptimizer).
hivemind would pre-schedule one and cancel it at the epoch's end; with two peers that start together
and each count only themselves, that cancel can land inside their join and break the averager's
matchmaking for the rest of the run (seen in CI: every later round "no averaging group formed in time")."""
import time
from functools import partial

import hivemind
import torch

from swarmtrain.averaging.sync import SwarmOptimizer


def test_a_lone_sync_peer_steps_its_epochs_without_pre_scheduling_a_round():
    dht = hivemind.DHT(start=True)
    optimizer = None
    try:
        model = torch.nn.Linear(8, 2)
        optimizer = SwarmOptimizer(
            dht=dht, run_id="lone_peer_test", params=model.parameters(), optimizer=partial(torch.optim.SGD, lr=0.1),
            target_batch_size=64, batch_size_per_step=8, matchmaking_time=2.0, averaging_timeout=10.0,
            client_mode=False, verbose=False)
        scheduled_seen = 0
        deadline = time.monotonic() + 60
        while optimizer.local_epoch < 3 and time.monotonic() < deadline:
            model(torch.randn(8, 8)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduled_seen += optimizer.scheduled_grads is not None
            time.sleep(0.1)  # 8 steps an epoch, 0.8 s: the epoch's end is always within the matchmaking window
        assert optimizer.local_epoch >= 3  # it trains on alone...
        assert scheduled_seen == 0  # ...with no round to cancel
        assert len(optimizer.rounds) >= 3 and not any(record.ok for record in optimizer.rounds), optimizer.rounds
    finally:
        if optimizer is not None:
            optimizer.shutdown()
        dht.shutdown()
