"""`swarmtrain peer`, sabotaged: after every backward pass it replaces its gradients with NaN (even
epochs) or scales them by 1e6 (odd epochs) before they are accumulated for averaging -- a broken
GPU or a hostile volunteer. Everything else (the wire protocol, the reducer it serves) is the real
peer's, so the test exercises what honest peers do with such parts, not a mock.

Usage: python tests/support/poisoning_peer.py peer --initial-peers ... (same arguments as swarmtrain)."""
import torch

from swarmtrain.cli import main
from swarmtrain.peer import trainer

_make_optimizer = trainer.make_optimizer


def _make_poisoning_optimizer(config, model, *args, **kwargs):
    optimizer = _make_optimizer(config, model, *args, **kwargs)
    honest_step = optimizer.step

    def poisoned_step(*step_args, **step_kwargs):
        with torch.no_grad():
            for param in model.parameters():
                if param.grad is not None:
                    if optimizer.local_epoch % 2 == 0:
                        param.grad.fill_(float("nan"))
                    else:
                        param.grad.mul_(1e6)
        return honest_step(*step_args, **step_kwargs)

    optimizer.step = poisoned_step
    return optimizer


trainer.make_optimizer = _make_poisoning_optimizer

if __name__ == "__main__":
    main(prog_name="swarmtrain")
