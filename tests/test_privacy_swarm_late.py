"""A trunk host that joins a split run late starts from the trained trunk (issue #5).

In process, on two loopback DHTs: the trunk averagers of swarmtrain.privacy.swarm share the live
trunk only once it holds more than the seeded initial weights, a newcomer loads it (checked) before
it serves, and a downloaded state that does not fit the trunk is refused.
"""
import logging
import threading

import pytest
import torch

from swarmtrain.privacy.config import SplitConfig
from swarmtrain.privacy.digits import NUM_CLASSES
from swarmtrain.privacy.split import TrunkHost
from swarmtrain.privacy.swarm import split_models
from swarmtrain.privacy.trunk_host import TRUNK_STATE_FORMAT, TrunkAverager, validate_trunk_state

SPLIT = SplitConfig(cut_width=16, hidden=32, trunk_hidden=32, average_every=3600.0, averaging_timeout=10.0)


def _trunk():
    return split_models(SPLIT, seed=0).classifier  # the seeded initial trunk every host starts from


def _averager(trunk, dht, steps=lambda: 0):
    return TrunkAverager(trunk, dht, "late-trunk-test", SPLIT, threading.Lock(), client_mode=False,
                         matchmaking_time=2.0, request_timeout=1.0, steps=steps)


def _shut_down(averagers, dhts):
    """Averagers first (those that were built), then their DHTs: explicitly, to avoid noisy tracebacks."""
    for averager in averagers:
        if averager is not None:
            averager.shutdown()
    for dht in dhts:
        dht.shutdown()


def _max_difference(module, tensors):
    return max(float((p.detach() - t).abs().max()) for p, t in zip(module.parameters(), tensors))


def test_a_late_trunk_host_loads_the_trained_trunk_and_a_fresh_one_donates_nothing(caplog):
    import hivemind

    first = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    second = hivemind.DHT(initial_peers=first.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    donor_trunk, late_trunk = _trunk(), _trunk()
    initial = [p.detach().clone() for p in late_trunk.parameters()]
    donor_host = TrunkHost(donor_trunk, torch.optim.Adam(donor_trunk.parameters(), lr=1e-2),
                           activation_shape=(SPLIT.cut_width,), num_classes=NUM_CLASSES)
    donor = late = None
    try:
        donor = _averager(donor_trunk, first, steps=lambda: donor_host.stats.steps)
        late = _averager(late_trunk, second)

        # 1) the other host has not trained: it offers nothing, so the newcomer keeps the initial trunk
        #    and says so in one line (a newcomer never takes the initial weights from another newcomer)
        assert not donor.share_if_trained()
        with caplog.at_level(logging.WARNING, logger="swarmtrain.split"):
            assert not late.load_from_peers(attempts=1)
        refusals = [r for r in caplog.records if "could not load the current trunk" in r.getMessage()]
        assert len(refusals) == 1 and "initial trunk weights" in refusals[0].getMessage()
        assert _max_difference(late_trunk, initial) == 0.0 and not late.loaded and not late.sharing

        # 2) the donor trains (steps as a data owner's requests would make them), then shares its trunk
        generator = torch.Generator().manual_seed(0)
        for _ in range(20):
            z = torch.randn(32, SPLIT.cut_width, generator=generator)
            donor_host._train_step(z, torch.randint(0, NUM_CLASSES, (32,), generator=generator))
            donor_host.stats.steps += 1
        assert _max_difference(donor_trunk, initial) > 1e-2
        assert donor.share_if_trained()

        # 3) the newcomer loads it: its trunk is now the donor's, not the initial one, and it may donate in turn
        assert late.load_from_peers(attempts=5, retry_delay=1.0)
        donor_now = [p.detach().clone() for p in donor_trunk.parameters()]
        assert _max_difference(late_trunk, donor_now) < 1e-6
        assert _max_difference(late_trunk, initial) > 1e-2
        assert late.loaded and late.sharing
    finally:
        _shut_down([late, donor], [second, first])


def test_a_downloaded_trunk_that_does_not_fit_is_refused():
    reference = list(_trunk().parameters())
    good = [p.detach().clone() for p in reference]
    tensors, steps = validate_trunk_state(({"format": TRUNK_STATE_FORMAT, "steps": 7}, good), reference)
    assert steps == 7 and all(torch.equal(a, b) for a, b in zip(tensors, good))

    nan = [t.clone() for t in good]
    nan[0][0, 0] = float("nan")
    inf = [t.clone() for t in good]
    inf[-1][0] = float("inf")
    wrong_shape = [t.clone() for t in good]
    wrong_shape[1] = torch.zeros(wrong_shape[1].numel() + 1)
    integers = [t.clone() for t in good]
    integers[0] = integers[0].long()
    cases = {
        "NaN or Inf": ({"format": TRUNK_STATE_FORMAT}, nan),
        "tensor 3 contains NaN or Inf": ({"format": TRUNK_STATE_FORMAT}, inf),
        "tensor 1 has shape": ({"format": TRUNK_STATE_FORMAT}, wrong_shape),
        "not a floating-point tensor": ({"format": TRUNK_STATE_FORMAT}, integers),
        "tensors, expected": ({"format": TRUNK_STATE_FORMAT}, good[:-1]),
        "not a trunk state": ({"group_key": "0"}, good),  # e.g. another averager's state
        "pair": "garbage",
    }
    for message, state in cases.items():
        with pytest.raises(ValueError, match=message):
            validate_trunk_state(state, reference)


def test_a_trunk_round_whose_groupmate_never_sends_ends_within_the_averaging_timeout(monkeypatch):
    """hivemind bounds a step's matchmaking by its timeout, not the all-reduce after it. A groupmate
    counted into the group that then sends nothing (it had given up on the group: hivemind's
    matchmaking race, seen in CI) held a trunk host's round -- and so every later one -- for ever."""
    import asyncio

    import hivemind

    from swarmtrain.privacy.trunk_host import TrunkStateAverager

    split = SplitConfig(cut_width=16, hidden=32, trunk_hidden=32, average_every=3600.0, averaging_timeout=4.0)
    first = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    second = hivemind.DHT(initial_peers=first.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    honest = silent = None
    try:
        honest = TrunkAverager(_trunk(), first, "stalled-trunk-test", split, threading.Lock(), client_mode=False,
                               matchmaking_time=2.0, request_timeout=1.0)

        async def never_sends(self, *args, **kwargs):
            await asyncio.sleep(3600)

        # (the averager runs in a forked process: the patch reaches the silent host's only)
        monkeypatch.setattr(TrunkStateAverager, "_aggregate_with_group", never_sends)
        silent = TrunkAverager(_trunk(), second, "stalled-trunk-test", split, threading.Lock(), client_mode=False,
                               matchmaking_time=2.0, request_timeout=1.0)
        monkeypatch.undo()

        records = []
        rounds = [threading.Thread(target=lambda host=host: records.append(host.average_once()), daemon=True)
                  for host in (honest, silent)]
        for thread in rounds:
            thread.start()
        rounds[0].join(timeout=4 * split.averaging_timeout)
        assert not rounds[0].is_alive(), "the honest host's round still waits for the silent groupmate"
        assert records and not records[0].ok and records[0].seconds < 3 * split.averaging_timeout, records
    finally:
        _shut_down([silent, honest], [second, first])
