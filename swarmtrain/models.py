"""Models built from transformers configs (never downloaded), and their loss on a batch."""
from __future__ import annotations

from typing import Optional

import torch
import transformers

from swarmtrain.config import ModelConfig
from swarmtrain.data import PAD_ID, VOCAB_SIZE, mask_tokens
from swarmtrain.errors import UserError


def build_model(config: ModelConfig, seq_len: int, seed: int) -> transformers.PreTrainedModel:
    """Same seed, same weights: peers that start together start identical."""
    fields = dict(config.config)
    try:
        if config.kind == "gpt2":
            fields.setdefault("n_positions", seq_len)
            model_config = transformers.GPT2Config(
                vocab_size=VOCAB_SIZE, bos_token_id=PAD_ID, eos_token_id=PAD_ID, **fields
            )
            model_class = transformers.GPT2LMHeadModel
            positions = model_config.n_positions
        else:
            fields.setdefault("max_position_embeddings", seq_len)
            model_config = transformers.AlbertConfig(vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, **fields)
            model_class = transformers.AlbertForMaskedLM
            positions = model_config.max_position_embeddings
    except (TypeError, ValueError) as error:
        raise UserError(f"model.config: {error}") from None
    if positions < seq_len:
        raise UserError(f"model.config allows {positions} positions but data.seq_len is {seq_len}; raise the former")
    torch.manual_seed(seed)
    try:
        return model_class(model_config)
    except (TypeError, ValueError, AssertionError, RuntimeError) as error:
        raise UserError(f"model.config is not a valid {config.kind} config: {error}") from None


def compute_loss(model: transformers.PreTrainedModel, batch: torch.Tensor, kind: str,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Causal LM: predict every next byte. Masked LM: predict the masked 15%."""
    if kind == "gpt2":
        return model(input_ids=batch, labels=batch).loss
    inputs, labels = mask_tokens(batch, generator if generator is not None else torch.Generator().manual_seed(0))
    return model(input_ids=inputs, labels=labels).loss


@torch.no_grad()
def heldout_loss(model: transformers.PreTrainedModel, heldout: torch.Tensor, kind: str, batch_size: int = 16) -> float:
    """Mean loss on the fixed held-out blocks (fixed masks for masked LMs)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    losses = [
        compute_loss(model, heldout[start : start + batch_size], kind, generator).item()
        for start in range(0, heldout.shape[0], batch_size)
    ]
    model.train(was_training)
    return float(sum(losses) / len(losses))


# where the embedded input enters the layer stack: X for the privacy head's dCor(X, Z), since
# distances between raw token ids mean nothing
EMBEDDED_INPUT_LAYER = {"gpt2": "transformer.h.0", "albert": "albert.encoder"}
