"""Privacy head: the defences at a cut layer of any torch model, attached with hooks.

    head = PrivacyHead(model, PrivacyConfig(enabled=True, cut_layer="features.3"), num_classes=10)
    logits = model(x)                       # hooks capture X (model input) and Z (cut output)
    loss = head.add_penalty(F.cross_entropy(logits, y), labels=y)
    loss.backward()
    head.last_leakage                       # float, read by monitoring
    head.stats                              # PrivacyStats snapshot of the last step

Three defences, each measured alone and together in benchmarks/privacy_defences.py:

* NoPeek (``alpha``): loss += alpha * dCor_V(X, Z) (Vepakomma et al.).
* Noise calibrated at the cut (``cut_noise`` = sigma): the cut layer's output is replaced by
  Z / rms(Z) + sigma * N(0, 1), the RMS taken per sample over the last dimension. The normalisation
  is what calibrates the noise: without it the layers before the cut could simply scale Z up until
  the noise no longer mattered. Everything downstream (the trunk, and any attacker) sees only this
  released Z, in training and in evaluation alike; each forward draws fresh noise.
* Adversarial reconstruction (``adversary_weight`` = lambda): the head keeps its own decoder
  (Z [+ one-hot label] -> X), refits it a few steps on every batch, and adds lambda * R^2 of that
  decoder (the fraction of X's variance it explains) to the loss, so the layers before the cut are
  pushed to remove what the decoder can read back. Given the label, the decoder can always draw the
  class mean, so this term does not fight the task (adversarial representation learning).

The alpha and adversary terms ramp up linearly over the first ``warmup_steps`` calls of
add_penalty/penalty (pushing dCor down at full weight from a random init collapses Z before it
carries the label); the adversary's decoder trains from the start.

Nothing in the model is rewritten apart from the cut's output under ``cut_noise``: the head
registers a forward pre-hook on the model (or on ``input_layer``) to see X, and a forward hook on
the cut layer to see (and, with noise, replace) Z. Z is what a data owner shares in split training
(``shared_activation``); X never leaves.

The penalty uses the V-statistic dCor (in [0, 1], smooth, as in NoPeek); the *reported* leakage uses
the configured statistic, by default the bias-corrected U form, because the V form is biased toward
1 at small batches/high dimension and would not be comparable across peers with different batches.
The audits report the same U statistic (swarmtrain.privacy.audits), on the whole held-out set.
"""
from __future__ import annotations

import secrets
import threading
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import PrivacyConfig
from .dcor import distance_correlation

# Keyword names under which common model families take their raw input (used when the model is
# called with keywords only, e.g. transformers' input_ids=...).
_INPUT_KWARGS = ("x", "input", "inputs", "pixel_values", "inputs_embeds", "input_values", "input_ids")
# The adversary's decoder maps flattened Z to flattened X: beyond this many input features per
# sample (a long sequence of wide embeddings) its output layer alone would dwarf most models.
MAX_ADVERSARY_TARGET_FEATURES = 65536
ADVERSARY_HIDDEN = 256
ADVERSARY_STEPS = 3        # decoder updates per owner step: a lagging decoder is easy to fool, not to defeat
ADVERSARY_LR = 1e-3
_RMS_EPS = 1e-12


@dataclass
class PrivacyStats:
    """Snapshot of the last step, for logs and the monitoring exporter."""

    step: int = 0                       # number of add_penalty/measure calls so far
    leakage: Optional[float] = None     # dCor(X, Z) by `leakage_statistic`, Z as released
    leakage_statistic: str = "u"
    dcor_v: Optional[float] = None      # V-statistic dCor (the one penalised)
    penalty: Optional[float] = None     # everything the head added to the loss
    task_loss: Optional[float] = None
    alpha: float = 0.0
    batch_size: int = 0
    cut_noise: float = 0.0
    adversary_r2: Optional[float] = None  # the adversary decoder's R^2 on this batch (after its refit)
    ramp: float = 1.0                   # the warm-up's weight on the alpha and adversary terms (0..1)

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


def _replace_first_tensor(output: Any, released: torch.Tensor) -> Any:
    """`output` with its activation tensor swapped for `released` (a tensor, or a tuple/list led by one)."""
    if isinstance(output, torch.Tensor):
        return released
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return type(output)([released, *output[1:]])
    raise RuntimeError(f"cut_noise needs a cut layer whose output is a tensor or a tuple starting with one, got "
                       f"{type(output).__name__}: choose another privacy.cut_layer or set cut_noise to 0")


def calibrated_release(z: torch.Tensor, sigma: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Z / rms(Z) + sigma * N(0, 1): the RMS is per sample over the last dimension, so each released
    row has unit signal power per coordinate whatever the layers before the cut do, and sigma is the
    noise-to-signal ratio. Differentiable in z; the noise is drawn on the CPU from `generator`."""
    rms = z.pow(2).mean(dim=-1, keepdim=True).add(_RMS_EPS).sqrt()
    noise = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
    return z / rms + sigma * noise


class ReconstructionAdversary(nn.Module):
    """The decoder a data owner trains against: (Z, one-hot label) -> X, an MLP on flattened tensors.

    `refit` takes ADVERSARY_STEPS Adam steps on a batch (Z detached: the decoder's training never
    moves the owner's layers); `explained_variance` is its R^2 on the batch, differentiable in Z, which
    the owner minimises. Without labels (num_classes 0) the decoder sees Z alone.

    :param z_features: flattened size of one sample's Z
    :param x_features: flattened size of one sample's X (the reconstruction target)
    :param num_classes: number of classes the decoder is conditioned on (0: not conditioned)
    :param hidden: width of the decoder's two hidden layers
    :param lr: Adam learning rate of the decoder
    """

    def __init__(self, z_features: int, x_features: int, num_classes: int = 0, hidden: int = ADVERSARY_HIDDEN,
                 lr: float = ADVERSARY_LR):
        super().__init__()
        if x_features > MAX_ADVERSARY_TARGET_FEATURES:
            raise ValueError(f"adversary_weight: X has {x_features} features per sample, more than the adversary's "
                             f"limit of {MAX_ADVERSARY_TARGET_FEATURES}; use alpha and cut_noise for this model")
        self.num_classes = num_classes
        self.net = nn.Sequential(nn.Linear(z_features + num_classes, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, x_features))
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)

    def _inputs(self, z: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        flat = z.reshape(z.shape[0], -1).float()
        if self.num_classes:
            if labels is None:
                raise ValueError("this adversary is conditioned on labels: pass labels= to the privacy head")
            flat = torch.cat([flat, F.one_hot(labels.long(), self.num_classes).to(flat)], dim=1)
        return flat

    def forward(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.net(self._inputs(z, labels))

    def refit(self, z: torch.Tensor, x: torch.Tensor, labels: Optional[torch.Tensor] = None,
              steps: int = ADVERSARY_STEPS) -> None:
        target = x.detach().reshape(x.shape[0], -1).float()
        with torch.enable_grad():
            for _ in range(steps):
                loss = F.mse_loss(self(z.detach(), labels), target)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()

    def explained_variance(self, z: torch.Tensor, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """1 - MSE / Var(X) on this batch (X's variance detached): 0 = no better than X's mean."""
        target = x.detach().reshape(x.shape[0], -1).float()
        variance = target.var(dim=0, unbiased=False).mean().clamp_min(_RMS_EPS)
        return 1.0 - F.mse_loss(self(z, labels), target) / variance


class PrivacyHead:
    """Attaches the privacy defences to `model` at `config.cut_layer`; see the module docstring.

    :param model: the model whose layer `config.cut_layer` outputs Z (it is not modified)
    :param config: the privacy settings (alpha, cut_noise, adversary_weight, warmup_steps, ...)
    :param input_layer: optional dotted path of a module whose *input* is taken as X (default: the
        model's own input). For token models dCor of raw token ids is not meaningful: name the first
        block (e.g. "transformer.h.0") so that X is the embedded input.
    :param num_classes: if given, the adversary's decoder also sees the one-hot label passed to
        add_penalty/penalty (labels=...), so it can always draw the class mean and the owner is pushed
        to remove what Z reveals *beyond* the label
    :param seed: seed of the cut noise and of the adversary's initial weights; None (the default)
        draws one from the OS, so nobody can predict the noise
    """

    def __init__(self, model: nn.Module, config: PrivacyConfig, *, input_layer: Optional[str] = None,
                 num_classes: Optional[int] = None, seed: Optional[int] = None):
        if not config.cut_layer:
            raise ValueError("PrivacyHead needs config.cut_layer (a dotted module path)")
        self.config = config
        self.model = model
        self.num_classes = num_classes or 0
        self.seed = secrets.randbits(63) if seed is None else seed
        self.noise_generator = torch.Generator().manual_seed(self.seed)
        self.adversary: Optional[ReconstructionAdversary] = None
        self.penalty_steps = 0  # penalty() calls so far: the warm-up counts these
        self.cut_module = resolve_module(model, config.cut_layer)
        input_module = model if input_layer is None else resolve_module(model, input_layer)
        self._local = threading.local()  # captures per thread: safe under data-parallel threads
        self._handles = [
            input_module.register_forward_pre_hook(self._capture_input, with_kwargs=True),
            self.cut_module.register_forward_hook(self._capture_cut),
        ]
        self.stats = PrivacyStats(alpha=config.alpha, leakage_statistic=config.leakage_statistic,
                                  cut_noise=config.cut_noise)

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
        z = _first_tensor(output)
        if self.config.cut_noise > 0 and z is not None:
            released = calibrated_release(z, self.config.cut_noise, self.noise_generator)
            self._local.z = released
            return _replace_first_tensor(output, released)  # what the rest of the model (and the wire) sees
        self._local.z = z
        return None

    # ---- captured tensors ----------------------------------------------------------------------
    @property
    def last_input(self) -> Optional[torch.Tensor]:
        return getattr(self._local, "x", None)

    @property
    def shared_activation(self) -> Optional[torch.Tensor]:
        """Z of the last forward as released (with the cut noise): the only tensor a data owner may
        send out (keeps its graph)."""
        return getattr(self._local, "z", None)

    @property
    def last_leakage(self) -> Optional[float]:
        return self.stats.leakage

    @property
    def ramp(self) -> float:
        """Weight of the alpha and adversary terms at the next penalty(): linear from 1/warmup_steps to 1."""
        if self.config.warmup_steps == 0:
            return 1.0
        return min(1.0, (self.penalty_steps + 1) / self.config.warmup_steps)

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
    @property
    def penalises(self) -> bool:
        """Whether the head adds anything to the loss (alpha or adversary_weight above 0)."""
        return self.config.alpha > 0 or self.config.adversary_weight > 0

    def penalty(self, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The privacy terms of the last forward: ramp * (alpha * dCor_V(X, Z) + adversary_weight * R^2
        of the adversary), differentiable w.r.t. the layers up to the cut (ramp: see warmup_steps).

        With adversary_weight > 0 this also refits the adversary's decoder on the batch; `labels`
        (int class ids, one per sample) condition it when the head was given num_classes.
        """
        x, z = self._captured()
        ramp = self.ramp
        self.penalty_steps += 1
        dcor_v = distance_correlation(x.detach(), z)
        total = ramp * self.config.alpha * dcor_v
        adversary_r2 = None
        if self.config.adversary_weight > 0:
            adversary = self._adversary_for(x, z)
            conditioned = labels if adversary.num_classes else None
            adversary.refit(z, x, conditioned)  # first catch up with the owner's last step, then push against it
            r2 = adversary.explained_variance(z, x, conditioned)
            adversary_r2 = float(r2.detach())
            total = total + ramp * self.config.adversary_weight * r2.to(total.dtype)
        self._record(x, z, dcor_v.detach(), penalty=float(total.detach()), adversary_r2=adversary_r2)
        return total

    def _adversary_for(self, x: torch.Tensor, z: torch.Tensor) -> ReconstructionAdversary:
        if self.adversary is None:
            with torch.random.fork_rng(devices=[]):  # its init must not shift the model's own random stream
                torch.manual_seed(self.seed)
                self.adversary = ReconstructionAdversary(z[0].numel(), x[0].numel(), self.num_classes).to(z.device)
        return self.adversary

    def add_penalty(self, task_loss: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """task_loss + the privacy terms (see penalty); also refreshes `stats` / `last_leakage`."""
        if not self.penalises:
            self.measure()  # no gradient needed, but still report leakage
            total = task_loss
        else:
            total = task_loss + self.penalty(labels).to(task_loss.dtype)
        self.stats.task_loss = float(task_loss.detach())
        return total

    @torch.no_grad()
    def measure(self) -> float:
        """Update the leakage stats from the last forward without building a graph; return leakage."""
        x, z = self._captured()
        self._record(x, z, distance_correlation(x, z))
        return self.stats.leakage

    def _record(self, x: torch.Tensor, z: torch.Tensor, dcor_v: torch.Tensor, *, penalty: Optional[float] = None,
                adversary_r2: Optional[float] = None) -> None:
        n = x.shape[0]
        if self.config.leakage_statistic == "v" or n < 4:  # the U form needs n ≥ 4; report V rather than fail
            leakage = float(dcor_v)
        else:
            with torch.no_grad():
                leakage = float(distance_correlation(x.detach(), z.detach(), unbiased=True))
        self.stats = PrivacyStats(step=self.stats.step + 1, leakage=leakage,
                                  leakage_statistic=self.config.leakage_statistic, dcor_v=float(dcor_v),
                                  penalty=penalty, alpha=self.config.alpha, batch_size=n,
                                  cut_noise=self.config.cut_noise, adversary_r2=adversary_r2, ramp=self.ramp)

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


def owner_head_config(privacy: PrivacyConfig, cut_layer: str) -> PrivacyConfig:
    """The head settings of a split run's data owner: the run's privacy section with the owner's own
    cut layer, every defence setting passed through unchanged. A disabled section turns every
    defence off (alpha, cut_noise and adversary_weight 0): the head then only measures leakage."""
    settings = privacy.model_dump(exclude={"split", "cut_layer", "enabled"})
    if not privacy.enabled:
        settings.update(alpha=0.0, cut_noise=0.0, adversary_weight=0.0)
    return PrivacyConfig(enabled=True, cut_layer=cut_layer, **settings)
