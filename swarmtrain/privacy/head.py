"""NoPeek privacy head: a forward hook at a cut layer of any torch model.

    head = PrivacyHead(model, PrivacyConfig(enabled=True, cut_layer="features.3", alpha=1.0))
    logits = model(x)                       # hooks capture X (model input) and Z (cut output)
    loss = head.add_penalty(F.cross_entropy(logits, y))   # + alpha * dCor_V(X, Z)
    loss.backward()
    head.last_leakage                       # float, read by monitoring
    head.stats                              # PrivacyStats snapshot of the last step

Nothing in the model is rewritten: the head registers a forward pre-hook on the model (or on
``input_layer``) to see X, and a forward hook on the cut layer to see Z. Z is what a data owner
shares in split training (``shared_activation``); X never leaves.

The penalty uses the V-statistic dCor (in [0, 1], smooth, as in NoPeek); the *reported* leakage uses
the configured statistic, by default the bias-corrected U form, because the V form is biased toward
1 at small batches/high dimension and would not be comparable across peers with different batches.
"""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import torch
from torch import nn

from .config import PrivacyConfig
from .dcor import distance_correlation

# Keyword names under which common model families take their raw input (used when the model is
# called with keywords only, e.g. transformers' input_ids=...).
_INPUT_KWARGS = ("x", "input", "inputs", "pixel_values", "inputs_embeds", "input_values", "input_ids")


@dataclass
class PrivacyStats:
    """Snapshot of the last step, for logs and the monitoring exporter."""

    step: int = 0                       # number of add_penalty/measure calls so far
    leakage: Optional[float] = None     # dCor(X, Z) by `leakage_statistic`
    leakage_statistic: str = "u"
    dcor_v: Optional[float] = None      # V-statistic dCor (the one penalised)
    penalty: Optional[float] = None     # alpha * dcor_v, as added to the loss
    task_loss: Optional[float] = None
    alpha: float = 0.0
    batch_size: int = 0

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """Return the submodule at a dotted path, or raise ValueError listing what exists."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        shown = ", ".join(names[:30]) + (" ..." if len(names) > 30 else "")
        raise ValueError(f"cut layer {path!r} not found in {type(model).__name__}; modules: {shown}") from None


def _first_tensor(value: Any) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    if isinstance(value, dict):
        for item in value.values():
            found = _first_tensor(item)
            if found is not None:
                return found
    # transformers' ModelOutput / BaseModelOutput: the hidden state is the first field
    if hasattr(value, "to_tuple"):
        return _first_tensor(value.to_tuple())
    return None


class PrivacyHead:
    """Attaches NoPeek to `model` at `config.cut_layer`; see the module docstring.

    input_layer: optional dotted path of a module whose *input* is taken as X (default: the model's
    own input). For token models dCor of raw token ids is not meaningful: name the first block
    (e.g. "transformer.h.0") so that X is the embedded input.
    """

    def __init__(self, model: nn.Module, config: PrivacyConfig, *, input_layer: Optional[str] = None):
        if not config.cut_layer:
            raise ValueError("PrivacyHead needs config.cut_layer (a dotted module path)")
        self.config = config
        self.model = model
        self.cut_module = resolve_module(model, config.cut_layer)
        input_module = model if input_layer is None else resolve_module(model, input_layer)
        self._local = threading.local()  # captures per thread: safe under data-parallel threads
        self._handles = [
            input_module.register_forward_pre_hook(self._capture_input, with_kwargs=True),
            self.cut_module.register_forward_hook(self._capture_cut),
        ]
        self.stats = PrivacyStats(alpha=config.alpha, leakage_statistic=config.leakage_statistic)

    # ---- hooks -------------------------------------------------------------------------------
    def _capture_input(self, module, args, kwargs):
        x = _first_tensor(args)
        if x is None:
            for key in _INPUT_KWARGS:
                if key in kwargs and isinstance(kwargs[key], torch.Tensor):
                    x = kwargs[key]
                    break
        if x is None:
            x = _first_tensor(kwargs)
        self._local.x = x
        self._local.z = None  # a new forward pass starts: forget the previous Z

    def _capture_cut(self, module, args, output):
        # If the cut layer runs several times in one forward (shared weights), the last call wins.
        self._local.z = _first_tensor(output)

    # ---- captured tensors ----------------------------------------------------------------------
    @property
    def last_input(self) -> Optional[torch.Tensor]:
        return getattr(self._local, "x", None)

    @property
    def shared_activation(self) -> Optional[torch.Tensor]:
        """Z of the last forward: the only tensor a data owner may send out (keeps its graph)."""
        return getattr(self._local, "z", None)

    @property
    def last_leakage(self) -> Optional[float]:
        return self.stats.leakage

    def _captured(self):
        x, z = self.last_input, self.shared_activation
        if x is None or z is None:
            raise RuntimeError(f"no activations captured at {self.config.cut_layer!r}: run a forward pass of the "
                               f"model first (and make sure the cut layer is on its path)")
        if x.shape[0] != z.shape[0]:
            raise RuntimeError(f"batch mismatch between model input {tuple(x.shape)} and cut activations "
                               f"{tuple(z.shape)}: is the batch dimension first at the cut layer?")
        return x, z

    # ---- loss and metric -----------------------------------------------------------------------
    def penalty(self) -> torch.Tensor:
        """alpha * dCor_V(X, Z) of the last forward (differentiable w.r.t. the layers up to the cut)."""
        x, z = self._captured()
        dcor_v = distance_correlation(x.detach(), z)
        self._record(x, z, dcor_v.detach())
        return self.config.alpha * dcor_v

    def add_penalty(self, task_loss: torch.Tensor) -> torch.Tensor:
        """task_loss + alpha * dCor(X, Z); also refreshes `stats` / `last_leakage`."""
        if self.config.alpha == 0.0:
            self.measure()  # no gradient needed, but still report leakage
            total = task_loss
        else:
            total = task_loss + self.penalty().to(task_loss.dtype)
        self.stats.task_loss = float(task_loss.detach())
        return total

    @torch.no_grad()
    def measure(self) -> float:
        """Update the leakage stats from the last forward without building a graph; return leakage."""
        x, z = self._captured()
        self._record(x, z, distance_correlation(x, z))
        return self.stats.leakage

    def _record(self, x: torch.Tensor, z: torch.Tensor, dcor_v: torch.Tensor) -> None:
        n = x.shape[0]
        if self.config.leakage_statistic == "v" or n < 4:  # the U form needs n ≥ 4; report V rather than fail
            leakage = float(dcor_v)
        else:
            with torch.no_grad():
                leakage = float(distance_correlation(x.detach(), z.detach(), unbiased=True))
        self.stats = PrivacyStats(step=self.stats.step + 1, leakage=leakage,
                                  leakage_statistic=self.config.leakage_statistic, dcor_v=float(dcor_v),
                                  penalty=self.config.alpha * float(dcor_v), alpha=self.config.alpha, batch_size=n)

    # ---- lifecycle -----------------------------------------------------------------------------
    def remove(self) -> None:
        """Detach the hooks; the model is left exactly as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "PrivacyHead":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attach_privacy_head(model: nn.Module, config: PrivacyConfig, **kwargs) -> Optional[PrivacyHead]:
    """Attach a head if `config.enabled`, else return None (what the peer calls at startup)."""
    return PrivacyHead(model, config, **kwargs) if config.enabled else None
