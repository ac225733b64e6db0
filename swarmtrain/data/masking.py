"""BERT-style masking for masked LMs."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from swarmtrain.data.tokenizer import BYTE_VOCABULARY, Vocabulary


def mask_tokens(input_ids: torch.Tensor, generator: torch.Generator, probability: float = 0.15,
                vocabulary: Optional[Vocabulary] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """15% of tokens are predicted; of those 80% become the mask token, 10% a random token, 10% stay.
    Returns (inputs, labels) with labels -100 where nothing is predicted."""
    vocabulary = vocabulary or BYTE_VOCABULARY
    if vocabulary.mask_id is None:
        raise ValueError("this tokenizer has no mask token, which a masked LM needs")
    labels = input_ids.clone()
    selected = torch.rand(input_ids.shape, generator=generator) < probability
    labels[~selected] = -100
    inputs = input_ids.clone()
    draw = torch.rand(input_ids.shape, generator=generator)
    inputs[selected & (draw < 0.8)] = vocabulary.mask_id
    random_positions = selected & (draw >= 0.8) & (draw < 0.9)
    random_ids = torch.randint(0, vocabulary.random_high, input_ids.shape, generator=generator)
    inputs[random_positions] = random_ids[random_positions]
    return inputs, labels
