"""Mode local's rounds meet only rounds of the same epoch (swarmtrain.averaging.local.schedule_round), on two
real hivemind averagers in this process. Before, a peer whose epoch counter ran one ahead joined the
others' round of the epoch before for the whole run, and ended apart from them (a demo's final models
were 0.48 apart)."""
import pytest
import torch
from hivemind.optim.grad_averager import GradientAverager
from hivemind.utils import get_dht_time

from swarmtrain.averaging.local import ROUND_KEY_BITS, round_group_bits, schedule_round


@pytest.fixture
def two_averagers(two_dhts):
    # the averager mode local builds is one of these (with compression and checks mixed in)
    averagers = [GradientAverager([torch.nn.Parameter(torch.zeros(4))], averaged_grads=[torch.full((4,), value)],
                                  dht=dht, prefix="round_keys_grad_averager", min_matchmaking_time=1.0,
                                  request_timeout=0.5, client_mode=False, start=True)
                 for dht, value in zip(two_dhts, (1.0, 3.0))]
    yield averagers
    for averager in averagers:
        averager.shutdown()


def _round(averagers, epochs):
    start = get_dht_time() + 1.0
    controls = [schedule_round(averager, start, epoch, gather=epoch, timeout=10.0)
                for averager, epoch in zip(averagers, epochs)]
    for control in controls:
        control.allow_allreduce()  # as the optimizer does once the delta is in the buffers
    outcomes = []
    for control in controls:
        try:
            outcomes.append(control.result(timeout=20))
        except Exception as error:  # hivemind's "could not find a group"
            outcomes.append(error)
    return outcomes


def _tensor(averager):
    with averager.get_tensors() as tensors:
        return tensors[0].clone()


def test_rounds_of_different_epochs_never_form_a_group(two_averagers):
    first, second = two_averagers
    assert all(isinstance(outcome, Exception) for outcome in _round(two_averagers, (5, 6)))
    assert torch.equal(_tensor(first), torch.full((4,), 1.0))  # nothing was averaged
    assert torch.equal(_tensor(second), torch.full((4,), 3.0))

    gathered = _round(two_averagers, (7, 7))
    assert all(isinstance(outcome, dict) and sorted(outcome.values()) == [7, 7] for outcome in gathered)
    assert torch.allclose(_tensor(first), torch.full((4,), 2.0))
    assert torch.allclose(_tensor(second), torch.full((4,), 2.0))


def test_round_group_bits_are_the_epoch_modulo_the_key_width():
    assert round_group_bits(0) == "0" * ROUND_KEY_BITS
    assert round_group_bits(5) != round_group_bits(6)
    assert round_group_bits(5) == round_group_bits(5 + 2 ** ROUND_KEY_BITS)
    assert len({round_group_bits(epoch) for epoch in range(2 ** ROUND_KEY_BITS)}) == 2 ** ROUND_KEY_BITS
