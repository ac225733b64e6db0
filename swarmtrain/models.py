"""Models built from transformers configs (never downloaded), and their loss on a batch.

``model.kind``: gpt2 (causal) and albert (masked) as before, or auto: any transformers model type
with a causal or masked LM head, from ``model.model_type`` + ``model.config`` (or a config.json read
into them when the run config was loaded). The vocabulary (size and special tokens) always comes from
the run's tokenizer: ``build_model(..., vocabulary=tokenizer.vocabulary)``.
"""
from __future__ import annotations

from typing import Optional

import torch
import transformers

from swarmtrain.config import ModelConfig
from swarmtrain.data import BYTE_VOCABULARY, Vocabulary, mask_tokens
from swarmtrain.errors import UserError

CAUSAL, MASKED = "causal", "masked"
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def objective_of(config: ModelConfig) -> str:
    """causal or masked: what ``compute_loss`` trains. An auto model type with a masked LM head (bert,
    roberta, ...) is masked unless model.objective says otherwise; one without is causal."""
    if config.kind == "gpt2":
        return CAUSAL
    if config.kind == "albert":
        return MASKED
    if config.objective is not None:
        return config.objective
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return MASKED if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else CAUSAL


def _auto_config(config: ModelConfig, seq_len: int, vocabulary: Vocabulary):
    fields = dict(config.config)
    declared = fields.pop("vocab_size", None)
    if declared is not None and declared != vocabulary.size:
        raise UserError(f"model.config vocab_size is {declared} but the tokenizer (data.tokenizer) has "
                        f"{vocabulary.size} tokens; remove vocab_size (it is taken from the tokenizer) or use "
                        f"the tokenizer this model was made for")
    fields.update(vocab_size=vocabulary.size, pad_token_id=vocabulary.pad_id,
                  bos_token_id=vocabulary.bos_id if vocabulary.bos_id is not None else vocabulary.separator_id,
                  eos_token_id=vocabulary.separator_id)
    try:
        model_config = transformers.AutoConfig.for_model(config.model_type, **fields)
    except (TypeError, ValueError) as error:
        raise UserError(f"model.config: {error}") from None
    present = [name for name in _POSITION_FIELDS if hasattr(model_config, name)]
    if present and not any(name in config.config for name in present):
        setattr(model_config, present[0], max(getattr(model_config, present[0]) or 0, seq_len))
    objective = objective_of(config)
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    mapping = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if objective == CAUSAL else MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if config.model_type not in mapping:
        raise UserError(f"model.model_type {config.model_type!r} has no {objective} LM head in transformers; "
                        f"set model.objective to the other one, or pick another model type")
    if objective == CAUSAL and hasattr(model_config, "is_decoder"):
        model_config.is_decoder = True  # an encoder type (bert) trained as a causal LM attends causally
    model_class = transformers.AutoModelForCausalLM if objective == CAUSAL else transformers.AutoModelForMaskedLM
    positions = min((getattr(model_config, name) for name in present if getattr(model_config, name)), default=None)
    return model_config, model_class.from_config, positions


def _fixed_config(config: ModelConfig, seq_len: int, vocabulary: Vocabulary):
    fields = dict(config.config)
    if config.kind == "gpt2":
        fields.setdefault("n_positions", seq_len)
        # bos/eos as before the tokenizer was configurable: the pad id for bytes, end of text otherwise
        eos = vocabulary.pad_id if vocabulary == BYTE_VOCABULARY else vocabulary.separator_id
        model_config = transformers.GPT2Config(vocab_size=vocabulary.size, bos_token_id=eos, eos_token_id=eos,
                                               pad_token_id=None if vocabulary == BYTE_VOCABULARY else vocabulary.pad_id,
                                               **fields)
        return model_config, transformers.GPT2LMHeadModel, model_config.n_positions
    fields.setdefault("max_position_embeddings", seq_len)
    model_config = transformers.AlbertConfig(vocab_size=vocabulary.size, pad_token_id=vocabulary.pad_id, **fields)
    return model_config, transformers.AlbertForMaskedLM, model_config.max_position_embeddings


def build_model(config: ModelConfig, seq_len: int, seed: int,
                vocabulary: Optional[Vocabulary] = None) -> transformers.PreTrainedModel:
    """Same seed, same weights: peers that start together start identical. ``vocabulary``: the run's
    tokenizer's (``TrainingData.vocabulary``); the byte tokenizer's when None."""
    vocabulary = vocabulary or BYTE_VOCABULARY
    if objective_of(config) == MASKED and vocabulary.mask_id is None:
        raise UserError("the tokenizer (data.tokenizer) has no mask token (<mask> or [MASK]), which a masked LM "
                        "needs; train one with `swarmtrain tokenizer train` or use a causal model")
    try:
        if config.kind == "auto":
            model_config, model_class, positions = _auto_config(config, seq_len, vocabulary)
        else:
            model_config, model_class, positions = _fixed_config(config, seq_len, vocabulary)
    except (TypeError, ValueError) as error:
        raise UserError(f"model.config: {error}") from None
    if positions is not None and positions < seq_len:
        raise UserError(f"model.config allows {positions} positions but data.seq_len is {seq_len}; raise the former")
    torch.manual_seed(seed)
    try:
        return model_class(model_config)
    except (TypeError, ValueError, AssertionError, RuntimeError, AttributeError) as error:
        raise UserError(f"model.config is not a valid {config.model_type or config.kind} config: {error}") from None


def check_model(config: ModelConfig, seq_len: int, vocabulary: Vocabulary) -> int:
    """Build the model on the meta device (no memory, no weights) to check the config against the
    tokenizer and seq_len before anything starts; returns its number of parameters."""
    with torch.device("meta"):
        model = build_model(config, seq_len, 0, vocabulary)
    return sum(parameter.numel() for parameter in model.parameters())


def _objective(kind: str) -> str:
    return {"gpt2": CAUSAL, "albert": MASKED}.get(kind, kind)


def compute_loss(model: transformers.PreTrainedModel, batch: torch.Tensor, kind: str,
                 generator: Optional[torch.Generator] = None, vocabulary: Optional[Vocabulary] = None) -> torch.Tensor:
    """Causal LM: predict every next token. Masked LM: predict the masked 15%. ``kind``: the
    objective (``objective_of(model_config)``), or gpt2 / albert."""
    if _objective(kind) == CAUSAL:
        return model(input_ids=batch, labels=batch).loss
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    inputs, labels = mask_tokens(batch, generator, vocabulary=vocabulary)
    return model(input_ids=inputs, labels=labels).loss


@torch.no_grad()
def heldout_loss(model: transformers.PreTrainedModel, heldout: torch.Tensor, kind: str, batch_size: int = 16,
                 vocabulary: Optional[Vocabulary] = None) -> float:
    """Mean loss on the fixed held-out blocks (fixed masks for masked LMs)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    losses = [
        compute_loss(model, heldout[start : start + batch_size], kind, generator, vocabulary).item()
        for start in range(0, heldout.shape[0], batch_size)
    ]
    model.train(was_training)
    return float(sum(losses) / len(losses))


# where the embedded input enters the layer stack: X for the privacy head's dCor(X, Z), since
# distances between raw token ids mean nothing
EMBEDDED_INPUT_LAYER = {"gpt2": "transformer.h.0", "albert": "albert.encoder"}


def embedded_input_layer(model: torch.nn.Module, kind: str) -> str:
    """EMBEDDED_INPUT_LAYER for gpt2 / albert; for auto models the first block of the layer stack
    (the first ModuleList's first entry, e.g. model.layers.0 for llama, bert.encoder.layer.0)."""
    if kind in EMBEDDED_INPUT_LAYER:
        return EMBEDDED_INPUT_LAYER[kind]
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return f"{name}.0"
    raise ValueError(f"found no layer stack in {type(model).__name__}")
