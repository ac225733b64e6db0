"""AdamW whose second moment stops changing after a warm-up: the optimizer for sparse averaging.

Why: GaussianK/top-k averaging with error feedback keeps each coordinate's unsent gradient and
delivers it later, typically as one large value every ~1/rho epochs. That is loss-free for an
optimizer whose update is *linear* in the gradient stream (SGD, momentum SGD), but Adam divides by
the running RMS of the very values it receives, so the rare large value both inflates the RMS and is
normalised to about one ordinary step: most of the delivered mass is lost (BENCHMARKS.md, (c')).

The 1-bit Adam / 0/1 Adam recipe: train with plain AdamW (and dense averaging) for a warm-up while
the variance estimate ``exp_avg_sq`` settles, then freeze it. From then on the update
``-lr * m_hat / (sqrt(v_frozen) + eps)`` is a fixed per-coordinate preconditioner applied to the
momentum, and the momentum is linear in the gradients, so the sum of the updates does not depend on
*when* error feedback delivers a gradient, only on how much it delivers.

Semantics:
- steps 1 .. ``freeze_variance_after`` are exactly ``torch.optim.AdamW`` (same formula, same state
  keys ``step``, ``exp_avg``, ``exp_avg_sq``, so ``state_dict``/``load_state_dict`` and hivemind's
  state download and optimizer-statistics averaging see an Adam state);
- from step ``freeze_variance_after + 1`` on, ``exp_avg_sq`` is left as it is and its bias
  correction stays at the value of step ``freeze_variance_after``; momentum, its bias correction and
  decoupled weight decay go on as in AdamW. One exception: a coordinate whose variance is still exactly
  0 (it never had a gradient) takes its first gradient's square, then stays frozen; without this, a
  warm-up with *sparse* averaging (most coordinates never sent) diverged after the freeze (eps alone
  in the denominator);
- the warm-up must average densely (the 1-bit Adam recipe): the frozen variance is only as good as
  the gradients that built it. Measured with a sparse warm-up, even with the guard above, it trains
  worse than plain Adam;
- ``freeze_variance_after=None`` never freezes (AdamW).

The freeze is decided from each parameter's own ``step`` counter, which is part of the saved and
downloaded state: a peer that joins late or restarts from a checkpoint freezes at the same epoch as
the swarm. Note that hivemind.Optimizer initialises the state with one zero-gradient step; it counts
as step 1 here exactly as it does in AdamW's bias correction (it leaves both moments at zero);
``make_torch_optimizer_factory`` passes the run config's ``freeze_variance_after + 1`` for that reason.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Tuple

import torch


class FrozenVarianceAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with ``exp_avg_sq`` frozen after ``freeze_variance_after`` steps.

    :param params, lr, betas, eps, weight_decay: as torch.optim.AdamW's
    :param freeze_variance_after: steps (per parameter) that update the variance; None: never frozen
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, freeze_variance_after: Optional[int] = None):
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"invalid eps: {eps}")
        if not all(0.0 <= beta < 1.0 for beta in betas) or len(betas) != 2:
            raise ValueError(f"invalid betas: {betas} (both must be in [0, 1))")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        if freeze_variance_after is not None and (isinstance(freeze_variance_after, bool)
                                                  or int(freeze_variance_after) != freeze_variance_after
                                                  or freeze_variance_after < 1):
            raise ValueError(f"freeze_variance_after must be a whole number of steps >= 1 (or None), "
                             f"got {freeze_variance_after!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        freeze_variance_after=None if freeze_variance_after is None else int(freeze_variance_after))
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # a state_dict saved by torch's AdamW has no such key
            group.setdefault("freeze_variance_after", self.defaults.get("freeze_variance_after"))

    @staticmethod
    def _frozen(step: float, freeze_after: Optional[int]) -> bool:
        return freeze_after is not None and step > freeze_after

    def variance_frozen(self) -> bool:
        """True once every parameter with state has passed its group's ``freeze_variance_after``."""
        seen = False
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param)
                if not state:
                    continue
                seen = True
                # the next update (step + 1) leaves the variance alone when step >= freeze_after
                if not self._frozen(float(state["step"]) + 1, group["freeze_variance_after"]):
                    return False
        return seen

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            freeze_after = group["freeze_variance_after"]
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("FrozenVarianceAdamW does not support sparse gradients")
                state = self.state[param]
                if len(state) == 0:
                    # the same keys and layout as torch.optim.AdamW (a float32 scalar step on the CPU)
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                step = float(state["step"])

                param.mul_(1 - lr * weight_decay)  # decoupled weight decay (AdamW)
                exp_avg.lerp_(grad, 1 - beta1)
                if self._frozen(step, freeze_after):
                    variance_step = float(freeze_after)  # the bias correction of the step that froze it
                    # a coordinate that never had a gradient before the freeze (a warm-up with sparse
                    # averaging leaves most at exactly 0) has no variance to freeze: dividing by eps would
                    # blow it up. It takes its first gradient's square (as a debiased estimate) and
                    # freezes from there
                    unseen = (exp_avg_sq == 0) & (grad != 0)
                    if unseen.any():
                        bias_correction2 = 1 - beta2 ** variance_step
                        exp_avg_sq.copy_(torch.where(unseen, grad * grad * bias_correction2, exp_avg_sq))
                else:
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    variance_step = step
                bias_correction1 = 1 - beta1 ** step
                bias_correction2_sqrt = math.sqrt(1 - beta2 ** variance_step)
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        return loss
