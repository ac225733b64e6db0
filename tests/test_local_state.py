"""What a local-mode peer serves to joiners and checkpointers (swarmtrain/peer/local.py), with two
real hivemind state averagers in one process: the last averaged model, not the half-trained one."""
import threading
import time

import torch
from hivemind.optim.state_averager import TrainingStateAverager

from swarmtrain.averaging.local import LocalStateAverager, land_delayed_outer_step, outer_step

PREFIX = "localstate_state_averager"


def _averager(cls, dht, model, **kwargs):
    return cls(dht=dht, prefix=PREFIX, optimizer=lambda params: torch.optim.AdamW(params, lr=0.1),
               params=model.parameters(), min_matchmaking_time=1.0, request_timeout=0.5, start=True, **kwargs)


def _load(averager, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # the donor declares itself in the DHT a moment after it starts
        averager.load_state_from_peers(timeout=5)
        if averager.local_epoch == 5:
            return
        time.sleep(0.5)
    raise AssertionError("no state downloaded")


def _set_round_in_flight(averager, round_epoch):
    """What LocalSwarmOptimizer does when it hands a round over (round_epoch) and when it lands (None)."""
    with averager.local_landed:
        averager.local_round_epoch = round_epoch
        if round_epoch is None:
            averager.local_landings += 1
            averager.local_landed.notify_all()


def test_the_averaged_model_is_served_and_loaded(two_dhts):
    donor_dht, joiner_dht = two_dhts
    donor_model = torch.nn.Linear(4, 3)
    donor = _averager(LocalStateAverager, donor_dht, donor_model)
    averagers = [donor]
    try:
        with torch.no_grad():
            for param in donor_model.parameters():
                param.fill_(-1.0)  # the donor's half-trained local model: must not be served
        donor.local_anchor = [torch.full_like(p, 7.0) for p in donor_model.parameters()]
        donor.local_momentum = [torch.full_like(p, 0.5) for p in donor_model.parameters()]
        donor.local_schedule = dict(next_epoch=8, rounds_done=3, anchor_epoch=4, log_kappa_ref=-1.0)
        donor.local_epoch = 5
        donor.state_sharing_priority = 5

        joiner_model = torch.nn.Linear(4, 3)
        joiner = _averager(LocalStateAverager, joiner_dht, joiner_model)
        averagers.append(joiner)
        joiner.local_anchor = [torch.zeros_like(p) for p in joiner_model.parameters()]
        joiner.local_momentum = [torch.zeros_like(p) for p in joiner_model.parameters()]
        _load(joiner)
        assert all(bool((p == 7.0).all()) for p in joiner_model.parameters())
        assert all(bool((a == 7.0).all()) for a in joiner.local_anchor)
        assert all(bool((m == 0.5).all()) for m in joiner.local_momentum)
        assert joiner.local_state_loaded["schedule"]["next_epoch"] == 8
        # the donor's optimizer state came along (AdamW's step count and moments)
        assert joiner.optimizer.state_dict()["state"][0]["exp_avg"].shape == (3, 4)

        # a plain hivemind state averager (the coordinator's, for checkpoints) takes the averaged
        # model as the parameters and ignores the outer momentum after the optimizer state
        plain_model = torch.nn.Linear(4, 3)
        plain = _averager(TrainingStateAverager, joiner_dht, plain_model, client_mode=True)
        averagers.append(plain)
        _load(plain)
        assert all(bool((p == 7.0).all()) for p in plain_model.parameters())

        # overlap: a donor asked mid-round waits for its round to land, then serves the new anchor,
        # labelled the epoch before the round it starts next (a downloader's next round is that one)
        donor.local_landed, donor.local_landing_wait = threading.Condition(), 5.0
        _set_round_in_flight(donor, 5)  # handed over at the start of epoch 5

        def land_and_start_the_next_round():
            time.sleep(0.3)
            _set_round_in_flight(donor, None)
            _set_round_in_flight(donor, 6)

        lander = threading.Thread(target=land_and_start_the_next_round)
        started = time.monotonic()
        lander.start()
        metadata = donor.get_current_state()[0]
        lander.join()
        assert 0.25 <= time.monotonic() - started < 5.0
        assert metadata["epoch"] == 5 and metadata["local_sgd"]["round_in_flight"] is False
        # a round that does not land in time: the state is marked, labelled one epoch before that round,
        # and a downloader refuses it and keeps its own model (taken, it would miss the round's result)
        donor.local_landing_wait = 0.2
        metadata = donor.get_current_state()[0]
        assert metadata["epoch"] == 5 and metadata["local_sgd"]["round_in_flight"] is True
        for anchor in donor.local_anchor:
            anchor.fill_(9.0)  # the anchor the round in flight will replace
        deadline = time.monotonic() + 30
        while not joiner.refused_mid_round and time.monotonic() < deadline:
            joiner.load_state_from_peers(timeout=5)
        assert joiner.refused_mid_round
        assert all(bool((p == 7.0).all()) for p in joiner_model.parameters())
        # no round in flight: the state of our own epoch, at once
        _set_round_in_flight(donor, None)
        assert donor.get_current_state()[0]["epoch"] == 5
        # a round scheduled from our anchor (its group forming) holds the state back too: here it is
        # dropped after 0.3 s without a group, and the state is served as it is, unmarked
        donor.local_landing_wait, pending = 5.0, [True]
        donor.local_round_pending = lambda: pending[0]
        threading.Timer(0.3, pending.__setitem__, (0, False)).start()
        started = time.monotonic()
        metadata = donor.get_current_state()[0]
        assert 0.25 <= time.monotonic() - started < 5.0
        assert metadata["epoch"] == 5 and metadata["local_sgd"]["round_in_flight"] is False
    finally:
        for averager in averagers:
            averager.shutdown()


def test_a_background_round_lands_on_the_new_anchor_with_the_steps_taken_meanwhile():
    """Mode local with overlap: the averaged delta moves the anchor, and the peer keeps the local steps it
    took while the round ran: θ = new anchor + (θ − θ at the hand-over). Without steps meanwhile that is
    the plain round's θ = new anchor."""
    anchor = [torch.tensor([1.0, 2.0]), torch.tensor([[0.5]])]
    launched = [torch.tensor([1.2, 1.4]), torch.tensor([[0.75]])]  # θ when the round began
    meanwhile = [torch.tensor([0.1, -0.2]), torch.tensor([[0.05]])]  # local steps while it ran
    parameters = [(start + step).requires_grad_() for start, step in zip(launched, meanwhile)]
    averaged = [torch.tensor([0.25, -0.5]), torch.tensor([[-0.125]])]  # the group's mean delta
    outer_step(anchor, None, averaged, outer_lr=2.0, outer_momentum=0.0)
    land_delayed_outer_step(parameters, launched, anchor)
    expected = [torch.tensor([1.5 + 0.1, 1.0 - 0.2]), torch.tensor([[0.25 + 0.05]])]  # anchor 1.5, 1.0 / 0.25
    for param, want in zip(parameters, expected):
        assert torch.allclose(param.detach(), want)
    still = [anchor_tensor.clone() for anchor_tensor in anchor]
    land_delayed_outer_step(still, still, anchor)  # no steps meanwhile: exactly the anchor
    assert all(torch.equal(a, b) for a, b in zip(still, anchor))
