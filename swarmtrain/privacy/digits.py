"""Small, offline digits task used by the privacy audits and tests (sklearn's bundled 8×8 digits)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import PrivacyConfig
from .head import PrivacyHead, owner_head_config

IMAGE_SHAPE = (8, 8)
NUM_FEATURES = 64
NUM_CLASSES = 10
# Cut layer of DigitsNet: the output of features.3 (second ReLU) is Z.
DIGITS_CUT_LAYER = "features.3"


@dataclass
class DigitsSplits:
    """Disjoint splits of the 1797 digits, pixels scaled to [0, 1].

    private: the data owner's training set; leaked: (X, Z) pairs an attacker is assumed to hold;
    test: held-out private data for accuracy and for judging the attacker's reconstructions.
    """

    private_x: torch.Tensor
    private_y: torch.Tensor
    leaked_x: torch.Tensor
    leaked_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_digits_splits(seed: int = 0, private: int = 900, leaked: int = 450) -> DigitsSplits:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    if private + leaked >= len(x):
        raise ValueError(f"private ({private}) + leaked ({leaked}) must leave test samples out of {len(x)}")
    xt = torch.tensor(x[order] / 16.0, dtype=torch.float32)
    yt = torch.tensor(y[order], dtype=torch.int64)
    a, b = private, private + leaked
    return DigitsSplits(xt[:a], yt[:a], xt[a:b], yt[a:b], xt[b:], yt[b:])


class DigitsNet(nn.Module):
    """MLP classifier; `features` runs on the data owner, `classifier` is the trunk."""

    def __init__(self, hidden: int = 256, cut_width: int = 64, trunk_hidden: int = 256):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(NUM_FEATURES, hidden), nn.ReLU(),
                                      nn.Linear(hidden, cut_width), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(cut_width, trunk_hidden), nn.ReLU(),
                                        nn.Linear(trunk_hidden, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x.reshape(x.shape[0], -1)))


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    # drop a ragged last batch: dCor over a handful of samples is a noisy penalty
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start:start + batch_size]


def train_private(x: torch.Tensor, y: torch.Tensor, privacy: PrivacyConfig, *, epochs: int = 300,
                  batch_size: int = 64, lr: float = 1e-3, cut_width: int = 64, seed: int = 0,
                  on_epoch: Optional[Callable[[int], None]] = None) -> Tuple[DigitsNet, PrivacyHead]:
    """Train DigitsNet with the privacy head of `privacy` at DIGITS_CUT_LAYER; returns (model, head).

    `privacy` is a run config's privacy section (its cut_layer and split are not used).
    loss = CE + the head's terms (alpha * dCor, adversary), ramped up over privacy.warmup_steps
    steps: pushing dCor down at full weight from a random init collapses Z before it carries the
    label (measured on digits, α=2, 80 epochs: accuracy 0.958 without warm-up vs 0.982 with 20
    warm-up epochs; with α=3 and an adversary at full weight from step 0, one seed of three
    collapsed to chance, none with the ramp). The head stays attached, so `model.features(x)`
    returns Z as released (with the cut noise).
    """
    torch.manual_seed(seed)
    model = DigitsNet(cut_width=cut_width)
    # the settings a split run's data owner would use (privacy.enabled false: no defence, leakage measured)
    head = PrivacyHead(model, owner_head_config(privacy, DIGITS_CUT_LAYER), num_classes=NUM_CLASSES, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        for idx in minibatches(len(x), batch_size, generator):
            loss = head.add_penalty(F.cross_entropy(model(x[idx]), y[idx]), labels=y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if on_epoch is not None:
            on_epoch(epoch)
    model.eval()
    return model, head


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())


@torch.no_grad()
def cut_activations(model: DigitsNet, x: torch.Tensor) -> torch.Tensor:
    """Z of x as the model releases it: with a privacy head attached, its cut noise included."""
    model.eval()
    return model.features(x.reshape(x.shape[0], -1))
