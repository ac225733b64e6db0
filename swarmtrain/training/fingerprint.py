"""Parameter fingerprints: a model's values at a few fixed pseudo-random positions, the same on every
peer, compared with a tolerance.

Peers in sync differ only by float rounding (dense averaging adds each peer's own (average - own part)
back to its own tensor: ~1e-8), while a peer one step off differs by about the learning rate
everywhere, so a handful of positions tells the two apart without moving the parameters over the
network. Sync mode gathers the live parameters' fingerprint in every gradient round; local mode the
last averaged model's (``averaging.schedule.MemberRecord``).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

Position = Tuple[int, int]  # (tensor index, offset inside the flattened tensor)


def fingerprint_positions(sizes: Sequence[int], count: int, seed: int) -> List[Position]:
    """`count` fixed pseudo-random positions in tensors of these sizes, the same on every peer."""
    total = sum(sizes)
    flat = torch.randint(total, (count,), generator=torch.Generator().manual_seed(seed))
    positions, offset, index = [], 0, 0
    for position in sorted(flat.tolist()):
        while position >= offset + sizes[index]:
            offset += sizes[index]
            index += 1
        positions.append((index, position - offset))
    return positions


def fingerprint(tensors: Sequence[torch.Tensor], positions: Sequence[Position]) -> List[float]:
    """The tensors' values at `positions`."""
    with torch.no_grad():
        return [float(tensors[index].reshape(-1)[offset]) for index, offset in positions]


def fingerprints_match(a: Sequence[float], b: Sequence[float], tolerance: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tolerance for x, y in zip(a, b))
