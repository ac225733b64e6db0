"""The run config: one YAML file, validated with pydantic, shared by every peer through the DHT.

The organiser writes it; the coordinator validates it, signs it and publishes it; volunteers never
see it as a file. Every field that is wrong produces one line naming the field and the fix.
"""
from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Dict, Literal, Optional, Tuple

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, ValidationError, ValidationInfo,
                      WithJsonSchema, field_validator, model_validator)

from swarmtrain.compression.spec import CompressionSpec, parse_compression_spec
from swarmtrain.errors import UserError
from swarmtrain.privacy.config import PrivacyConfig

SCHEDULE_FORMS = ("steps:H (average about every H local steps of each peer, re-measured as peers join, e.g. "
                  "steps:5), constant:H (every H epochs, e.g. constant:8) or adaptive")
DEFAULT_PERIODS_PER_BUDGET = 8  # averaging.round_budget defaults to optimizer.total_epochs // this
_LOCAL_ONLY = ("outer_lr", "outer_momentum", "feedback_decay", "round_budget", "min_period", "max_period")
_ADAPTIVE_ONLY = ("round_budget", "min_period", "max_period")
# Bounds of what a volunteer's peer can run: a value beyond them is a typo or an attack, and a peer
# handed it looped, hung or crashed (issue #20). Each is far beyond any real run's.
MAX_SEED = 2**32 - 1  # numpy's seeds
MAX_TARGET_BATCH_SIZE = 2**24  # samples per swarm step (large-batch LAMB runs use ~64k)
MAX_EPOCHS = 10**7
MAX_SECONDS = 3600.0  # any timeout or matchmaking time
MAX_CONFIG_BYTES = 1 << 20  # a run config is a page of YAML
MAX_SEQ_LEN = 8192  # attention is quadratic in it: at 65536 a peer's first step never ended
# transformers config class of each model.kind, and the size fields a peer must be able to build
# (inclusive bounds); other numbers must be finite
MODEL_CONFIG_CLASSES = {"gpt2": "GPT2Config", "albert": "AlbertConfig"}
MODEL_SIZE_FIELDS = {
    "gpt2": {"n_layer": 256, "n_head": 256, "n_embd": 65536, "n_positions": 65536, "n_inner": 262144},
    "albert": {"num_hidden_layers": 256, "num_attention_heads": 256, "hidden_size": 65536, "embedding_size": 65536,
               "intermediate_size": 262144, "max_position_embeddings": 65536, "num_hidden_groups": 256,
               "inner_group_num": 256},
}
MODEL_HEADS = {"gpt2": ("n_embd", "n_head"), "albert": ("hidden_size", "num_attention_heads")}


@dataclass(frozen=True)
class Schedule:
    """When `averaging.mode: local` averages: every `period` local steps (steps), every `period` epochs
    (constant) or adaptively."""

    kind: str  # "steps", "constant" or "adaptive"
    period: Optional[int] = None  # steps and constant only

    def __str__(self) -> str:
        return self.kind if self.kind == "adaptive" else f"{self.kind}:{self.period}"


def parse_schedule(text) -> Schedule:
    """`steps:H`, `constant:H` or `adaptive`; ValueError naming the accepted forms otherwise."""
    if isinstance(text, Schedule):
        return text
    if isinstance(text, str):
        value = text.strip().lower()
        if value == "adaptive":
            return Schedule("adaptive")
        match = re.fullmatch(r"(constant|steps):\s*(\d+)", value)
        if match and 1 <= int(match.group(2)) <= MAX_EPOCHS:
            return Schedule(match.group(1), int(match.group(2)))
    raise ValueError(f"averaging.schedule must be {SCHEDULE_FORMS}; got {text!r}")


def _compression_spec(value) -> CompressionSpec:
    return value if isinstance(value, CompressionSpec) else parse_compression_spec(value)


# parsed once, here, from the YAML text; written back as that text when the config is published
CompressionField = Annotated[CompressionSpec, PlainValidator(_compression_spec),
                             PlainSerializer(str, return_type=str, when_used="json"),
                             WithJsonSchema({"type": "string"})]
ScheduleField = Annotated[Schedule, PlainValidator(parse_schedule),
                          PlainSerializer(str, return_type=str, when_used="json"),
                          WithJsonSchema({"type": "string"})]


class _Section(BaseModel):
    # unknown keys are almost always typos ("learning_rate" for "lr"): reject them loudly; and no
    # float field of a run takes inf or nan (`lr: .inf` had peers loop on non-finite losses)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _model_config_fields(kind: str) -> Optional[set]:
    """The fields transformers' config class for ``kind`` knows (with its aliases); None for a kind
    without one here."""
    name = MODEL_CONFIG_CLASSES.get(kind)
    if name is None:
        return None
    import transformers  # only here: it takes seconds to import, and only model configs need it

    config_class = getattr(transformers, name)
    return set(config_class().to_dict()) | set(config_class.attribute_map)


def check_model_fields(kind: str, fields: Dict[str, Any]) -> None:
    """ValueError (one line) for a model.config a peer could not build: an unknown field, a size out of
    bounds, a non-finite number, heads that do not divide the width."""
    known = _model_config_fields(kind)
    for name, value in fields.items():
        if known is not None and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"did you mean {close[0]}?" if close else "see transformers' " + MODEL_CONFIG_CLASSES[kind]
            raise ValueError(f"{name} is not a {kind} config field ({hint})")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
    for name, largest in MODEL_SIZE_FIELDS.get(kind, {}).items():
        value = fields.get(name)
        if value is None and name == "n_inner":
            continue
        if name in fields and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= largest):
            raise ValueError(f"{name} must be a whole number from 1 to {largest}, got {value!r}")
    width, heads = MODEL_HEADS.get(kind, (None, None))
    if width in fields and heads in fields and fields[width] % fields[heads]:
        raise ValueError(f"{width} ({fields[width]}) must be a multiple of {heads} ({fields[heads]})")


class ModelConfig(_Section):
    # gpt2: causal LM (transformers' GPT2Config); albert: masked LM (AlbertConfig); auto: any transformers
    # model type with a causal or masked LM head (llama, gpt_neox, bert, roberta, ...), from model_type
    # or a local config.json. Models are built locally from the config, never downloaded.
    kind: Literal["gpt2", "albert", "auto"] = Field(description="gpt2, albert, or auto (model_type / config_file)")
    model_type: Optional[str] = Field(None, description="auto: a transformers model type, e.g. llama, bert")
    config_file: Optional[str] = Field(None, description="auto: a local config.json; read once, into model_type and config")
    objective: Optional[Literal["causal", "masked"]] = Field(
        None, description="auto: which head to train; by default masked for types that have one (bert), else causal")
    # fields of the transformers config; vocab_size is set from the data's tokenizer
    config: Dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _read_config_file(cls, data: Any) -> Any:
        # the published run config must be complete on its own: a volunteer has no copy of the file
        if not isinstance(data, dict) or not data.get("config_file"):
            return data
        if data.get("kind") != "auto":
            raise ValueError("config_file applies to kind: auto only; remove it or set kind: auto")
        if data.get("model_type"):
            raise ValueError("give model_type or config_file, not both (the file names its model_type)")
        path = Path(str(data["config_file"])).expanduser()
        try:
            fields = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"config_file {path}: no such file; give the path of a transformers config.json") from None
        except (OSError, ValueError) as error:
            raise ValueError(f"config_file {path}: not a readable JSON file ({error})") from None
        if not isinstance(fields, dict) or not fields.get("model_type"):
            raise ValueError(f"config_file {path}: not a transformers config.json (it has no model_type)")
        architecture = {k: v for k, v in fields.items() if k not in _CONFIG_FILE_METADATA and not k.startswith("_")}
        model_type = architecture.pop("model_type")
        return {**data, "config_file": None, "model_type": model_type,
                "config": {**architecture, **dict(data.get("config") or {})}}

    @field_validator("config")
    @classmethod
    def _no_vocab(cls, value: Dict[str, Any], info: ValidationInfo) -> Dict[str, Any]:
        # kind: auto may keep a config.json's vocab_size: the model checks it against the tokenizer's
        if "vocab_size" in value and info.data.get("kind") != "auto":
            raise ValueError("remove vocab_size: it is set from the data's tokenizer")
        return value

    @field_validator("config")
    @classmethod
    def _buildable(cls, value: Dict[str, Any], info: ValidationInfo) -> Dict[str, Any]:
        kind = info.data.get("kind")
        if kind == "auto":
            if info.data.get("model_type"):  # (an unknown model_type is reported by _consistent)
                cls._check_auto_fields(info.data["model_type"], value)
        elif kind is not None:  # (a wrong kind is reported on its own)
            check_model_fields(kind, value)
        return value

    # kind: auto: bounds of the size fields most transformers configs share (as check_model_fields for
    # gpt2 / albert: beyond them is a typo or an attack, and a peer handed it would hang or crash)
    AUTO_SIZE_FIELDS: ClassVar[Dict[str, int]] = {
        "num_hidden_layers": 256, "num_attention_heads": 256, "num_key_value_heads": 256, "hidden_size": 65536,
        "intermediate_size": 262144, "max_position_embeddings": 65536, "n_layer": 256, "n_head": 256,
        "n_embd": 65536, "n_positions": 65536, "n_inner": 262144, "vocab_size": 1 << 21}

    @classmethod
    def _check_auto_fields(cls, model_type: str, fields: Dict[str, Any]) -> None:
        import transformers  # only here: it takes seconds to import

        try:
            config_class = type(transformers.AutoConfig.for_model(model_type))
        except (ValueError, KeyError):
            return
        known = set(config_class().to_dict()) | set(getattr(config_class, "attribute_map", {}))
        for name, value in fields.items():
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f"did you mean {close[0]}?" if close else f"see transformers' {config_class.__name__}"
                raise ValueError(f"{name} is not a {model_type} config field ({hint})")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
            largest = cls.AUTO_SIZE_FIELDS.get(name)
            if largest is not None and value is not None and (
                    not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= largest):
                raise ValueError(f"{name} must be a whole number from 1 to {largest}, got {value!r}")
        width, heads = fields.get("hidden_size"), fields.get("num_attention_heads")
        if isinstance(width, int) and isinstance(heads, int) and width % heads:
            raise ValueError(f"hidden_size ({width}) must be a multiple of num_attention_heads ({heads})")

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        if self.kind != "auto":
            for name in ("model_type", "objective"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to kind: auto only; remove it or set kind: auto")
            return self
        if not self.model_type:
            raise ValueError("kind: auto needs model_type (e.g. llama, gpt_neox, bert) or config_file (a config.json)")
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if self.model_type not in CONFIG_MAPPING_NAMES:
            close = [name for name in CONFIG_MAPPING_NAMES if self.model_type.replace("-", "_") in name][:5]
            raise ValueError(f"model_type {self.model_type!r} is not a transformers model type"
                             + (f" (did you mean {', '.join(close)}?)" if close else " (e.g. llama, gpt_neox, bert)"))
        return self


# keys of a saved config.json that describe the file, not the architecture
_CONFIG_FILE_METADATA = {"architectures", "transformers_version", "torch_dtype", "dtype", "auto_map", "use_cache"}


class DataConfig(_Section):
    # stdlib: the Python standard library's own .py files (offline, every install has them)
    # text: local text files (a file, a directory searched recursively, or a glob)
    # datasets: a dataset saved with save_to_disk (memory-mapped Arrow), a directory of data files
    # (parquet, json, csv, ...) or a hub name (online); both of the latter are streamed
    source: Literal["stdlib", "text", "datasets"] = "stdlib"
    path: Optional[str] = None
    text_column: str = "text"
    split: str = Field("train", description="datasets: the split to read")
    # bytes (ids 0..255 and three specials: the demo's), a tokenizer.json or a directory holding one
    # (`swarmtrain tokenizer train` writes one), or a hub name (online)
    tokenizer: str = "bytes"
    # filled in by the coordinator from the tokenizer when it publishes the run (write them to pin it):
    # every peer checks its tokenizer against this hash, and models take their vocab size from it
    tokenizer_sha256: Optional[str] = Field(None, pattern=r"^[0-9a-f]{64}$")
    vocab_size: Optional[int] = Field(None, ge=1, le=1 << 21)
    seq_len: int = Field(128, ge=8, le=MAX_SEQ_LEN)
    heldout_blocks: int = Field(64, ge=1, le=100_000, description="blocks in the held-out set, the same on every peer")
    max_bytes: Optional[int] = Field(None, gt=0, description="cap on corpus size read, for quick runs")
    # the corpus is cut into shards of shard_bytes (each read on its own; peers split the shards between
    # them); a small corpus into at least num_shards
    shard_bytes: int = Field(1 << 20, ge=1024, le=1 << 30)
    num_shards: int = Field(64, ge=1, le=2**20)

    @model_validator(mode="after")
    def _consistent(self) -> "DataConfig":
        if self.source != "stdlib" and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        if self.tokenizer == "bytes" and self.tokenizer_sha256 is not None:
            raise ValueError("tokenizer_sha256 is for a tokenizer file; remove it (data.tokenizer is bytes)")
        if self.tokenizer == "bytes" and self.vocab_size not in (None, 259):
            raise ValueError("vocab_size of the byte tokenizer is 259; remove data.vocab_size")
        return self


class OptimizerConfig(_Section):
    # adamw_frozen: AdamW whose variance stops changing after freeze_variance_after epochs
    # (swarmtrain/peer/frozen_adam.py), the 1-bit Adam recipe for sparse (gaussiank/topk) averaging
    name: Literal["lamb", "adamw", "adamw_frozen"] = "lamb"
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(0.01, ge=0, le=10)
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-6, gt=0, le=1)
    eight_bit: bool = Field(False, description="bitsandbytes 8-bit optimizer state (home GPUs)")
    warmup_epochs: int = Field(10, ge=0, le=MAX_EPOCHS, description="linear warm-up, in global optimizer steps (epochs)")
    total_epochs: int = Field(1000, ge=1, le=MAX_EPOCHS, description="linear decay to zero ends here")
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    freeze_variance_after: Optional[int] = Field(
        None, ge=1, le=MAX_EPOCHS, description="adamw_frozen only: epochs (optimizer steps) that update the variance")

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: Tuple[float, float]) -> Tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError("both betas must be in [0, 1), e.g. [0.9, 0.999]")
        return value

    @model_validator(mode="after")
    def _frozen_variance(self) -> "OptimizerConfig":
        if self.name == "adamw_frozen":
            if self.freeze_variance_after is None:
                raise ValueError("name adamw_frozen needs optimizer.freeze_variance_after (epochs of plain "
                                 "AdamW before the variance is frozen, e.g. 20)")
            if self.eight_bit:
                raise ValueError("adamw_frozen has no 8-bit variant; set eight_bit: false or use adamw")
            if self.freeze_variance_after >= self.total_epochs:
                raise ValueError(f"freeze_variance_after ({self.freeze_variance_after}) must be below total_epochs "
                                 f"({self.total_epochs}), or the variance never freezes; use adamw for that")
        elif self.freeze_variance_after is not None:
            raise ValueError(f"freeze_variance_after applies to name adamw_frozen only (name is {self.name}); "
                             "remove it or set name: adamw_frozen")
        return self


class AveragingConfig(_Section):
    mode: Literal["sync", "local"] = "sync"
    compression: CompressionField = CompressionSpec("fp16")
    schedule: Optional[ScheduleField] = Field(None, description="local mode only: constant:H or adaptive")
    # sparse compression only: start at density 1/64 and reach the spec's density geometrically over
    # this many epochs (the GaussianK paper's warm-up); 0 starts at the target density
    density_warmup_epochs: int = Field(0, ge=0, le=MAX_EPOCHS)
    # sparse compression only: average densely (density 1, through the sparse codec) for this many
    # epochs first -- the 1-bit Adam recipe's warm-up, needed by optimizer.name adamw_frozen
    dense_warmup_epochs: int = Field(0, ge=0, le=MAX_EPOCHS)
    matchmaking_time: float = Field(3.0, gt=0, le=MAX_SECONDS)
    averaging_timeout: float = Field(60.0, gt=0, le=MAX_SECONDS)
    request_timeout: float = Field(1.0, gt=0, le=MAX_SECONDS)  # below matchmaking_time (see the check below)
    # rounds run while the peer computes. Mode sync: hivemind's delayed parameter updates -- at an
    # epoch's end a peer goes on computing the next epoch's gradients while the last epoch's are
    # averaged and applied, one epoch late (the "Training Transformers Together" recipe). Mode local:
    # the peer goes on with its local steps while the round averages its delta; the round lands with
    # the delayed outer step (averaging/local.py). False: a peer waits for every round. Off by default:
    # in mode sync it cost the demo held-out loss (3.53 against 3.26 without, issue #19's note); in mode
    # local the demo config turns it on (utilization 0.95 against 0.81 at 1.008x the held-out loss) when
    # an epoch is longer than a round -- the next round point waits for the one in flight
    overlap: bool = False
    # parameters are averaged every this many epochs as a safety net against drift (e.g. a peer
    # that stepped on local gradients when its group failed); 0 disables it
    state_averaging_every: int = Field(0, ge=0, le=MAX_EPOCHS)
    # what a reducer does with the parts it receives (swarmtrain/compression/robust.py): non-finite
    # parts are always dropped; a part whose norm exceeds max_norm_ratio x the group's median is scaled
    # down to that bound, and one over 10x the bound dropped (0 turns both off; in a group of two, with no
    # median, each member refuses a round whose
    # other gradient is over max_norm_ratio x its own); `clip` / `centered_clip` bound any one sender's pull on the
    # average, for swarms of strangers (at the price of exact error-feedback conservation)
    aggregation: Literal["mean", "clip", "centered_clip"] = "mean"
    max_norm_ratio: float = Field(10.0, ge=0, le=1e6)
    # mode: local only (swarmtrain/peer/local.py): at each averaging point the peers average their model
    # delta since the last one and apply it with an outer step, anchor + outer_lr * (avg delta [+ Nesterov
    # momentum]); outer_lr 1 and outer_momentum 0 is plain averaging (DiLoCo: 0.7 and 0.9)
    outer_lr: float = Field(1.0, gt=0, le=10)
    outer_momentum: float = Field(0.0, ge=0, lt=1)
    # mode: local with sparse compression only: the error-feedback residual is multiplied by this after
    # every round (SparseLoCo's β: the decayed residual takes the place of the outer momentum; 1: plain
    # error feedback). SparseLoCo pairs it with outer_momentum 0
    feedback_decay: float = Field(1.0, gt=0, le=1)
    # schedule: adaptive only (swarmtrain/averaging/schedule.py): averaging rounds planned over
    # optimizer.total_epochs (default total_epochs // 8), and the bounds of the period, in epochs;
    # max_period also bounds steps:H (a swarm grown large still averages at least every max_period epochs)
    round_budget: Optional[int] = Field(None, ge=1, le=MAX_EPOCHS)
    min_period: int = Field(1, ge=1, le=MAX_EPOCHS)
    max_period: int = Field(32, ge=1, le=MAX_EPOCHS)

    @model_validator(mode="after")
    def _consistent(self) -> "AveragingConfig":
        if self.mode == "sync" and self.schedule is not None:
            raise ValueError("averaging.schedule applies to mode: local only; remove it or set mode: local")
        self._check_local_fields()
        if self.request_timeout >= self.matchmaking_time:
            raise ValueError(
                "averaging.request_timeout must be below averaging.matchmaking_time, or groups split"
            )
        return self

    def _check_local_fields(self) -> None:
        """The local-mode fields and their consistency. A field "is set" when it differs from its
        default: a published config carries every field."""
        fields = type(self).model_fields
        explicitly_set = {name for name in _LOCAL_ONLY if getattr(self, name) != fields[name].default}
        if self.mode != "local":
            for name in _LOCAL_ONLY:
                if name in explicitly_set:
                    raise ValueError(f"averaging.{name} applies to mode: local only; remove it or set mode: local")
            return
        if self.schedule is None:
            raise ValueError(f"averaging.schedule is required with mode: local; use {SCHEDULE_FORMS}")
        if self.schedule.kind != "adaptive":
            for name in _ADAPTIVE_ONLY:
                if name in explicitly_set and not (name == "max_period" and self.schedule.kind == "steps"):
                    raise ValueError(f"averaging.{name} applies to schedule: adaptive only; remove it or set "
                                     f"schedule: adaptive")
        if self.min_period > self.max_period:
            raise ValueError(f"averaging.min_period ({self.min_period}) must not exceed averaging.max_period "
                             f"({self.max_period})")
        if self.state_averaging_every:
            raise ValueError("averaging.state_averaging_every applies to mode: sync only; in mode: local "
                             "averaging.schedule decides when the model is averaged")
        if self.feedback_decay != 1.0 and not self.compression.is_sparse:
            raise ValueError(f"averaging.feedback_decay decays the residual of sparse compression; with "
                             f"compression {self.compression} there is none: remove it or use e.g. gaussiank:0.02+2bit")

    def resolved_round_budget(self, total_epochs: int) -> int:
        """averaging.round_budget, or its default: one round per DEFAULT_PERIODS_PER_BUDGET epochs."""
        return self.round_budget or max(1, total_epochs // DEFAULT_PERIODS_PER_BUDGET)


class AccessConfig(_Section):
    # open: anyone with the coordinator's address may join; token: only peers holding an unexpired
    # token issued by the coordinator (`swarmtrain coordinator issue-token`) reach the DHT and averaging
    mode: Literal["open", "token"] = "open"


class RunConfig(_Section):
    run_id: str = Field(description="names the run in the DHT; letters, digits, '-' and '_'")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    # required, except on a split run (privacy.split): its models are the split task's, not this one
    model: Optional[ModelConfig] = Field(description="the model to train (gpt2, albert or auto)")
    data: DataConfig = Field(default_factory=DataConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    target_batch_size: int = Field(gt=0, le=MAX_TARGET_BATCH_SIZE,
                                   description="samples the swarm accumulates per optimizer step")
    averaging: AveragingConfig = Field(default_factory=AveragingConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    access: AccessConfig = Field(default_factory=AccessConfig)

    @model_validator(mode="before")
    @classmethod
    def _no_model_on_a_split_run(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        privacy = data.get("privacy")
        split = privacy.get("split") if isinstance(privacy, dict) else getattr(privacy, "split", None)
        if split is not None:
            return {"model": None, **data}  # a split run needs no model section (one given is ignored)
        if "model" in data and data["model"] is None:  # reported like a missing one: "model: required field ..."
            return {key: value for key, value in data.items() if key != "model"}
        return data

    @model_validator(mode="after")
    def _cross_section_checks(self) -> "RunConfig":
        optimizer, averaging = self.optimizer, self.averaging
        if (optimizer.name == "adamw_frozen" and averaging.compression.is_sparse
                and averaging.dense_warmup_epochs < optimizer.freeze_variance_after):
            # a variance frozen from sparse rounds (most entries never sent) trains worse than plain
            # Adam: BENCHMARKS.md (c'')
            raise ValueError(
                f"optimizer.name adamw_frozen with sparse averaging.compression {averaging.compression!r} freezes "
                f"the variance after {optimizer.freeze_variance_after} epochs, so those epochs must average densely: "
                f"set averaging.dense_warmup_epochs: {optimizer.freeze_variance_after} (now "
                f"{averaging.dense_warmup_epochs})")
        self._check_round_budget()
        return self

    def _check_round_budget(self) -> None:
        """averaging.round_budget against optimizer.total_epochs (mode: local, schedule: adaptive)."""
        averaging, total = self.averaging, self.optimizer.total_epochs
        if averaging.mode != "local" or averaging.schedule.kind != "adaptive":
            return
        budget = averaging.resolved_round_budget(total)
        if budget * averaging.max_period < total:
            raise ValueError(f"averaging.round_budget ({budget}) x averaging.max_period ({averaging.max_period}) must "
                             f"cover optimizer.total_epochs ({total}); raise either")
        if budget * averaging.min_period > total:
            raise ValueError(f"averaging.round_budget ({budget}) x averaging.min_period ({averaging.min_period}) "
                             f"exceeds optimizer.total_epochs ({total}); lower either")

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, value: str) -> str:
        # hivemind builds DHT keys and averaging prefixes from it; '.' breaks them
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
            raise ValueError("use 1-64 letters, digits, '-' or '_' (no dots or spaces), e.g. my-run-1")
        return value


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field (misspelled?); remove it or check the example configs in configs/"
    elif first["type"] == "missing":
        message = "required field is missing"
    more = len(error.errors()) - 1
    return f"{where}: {message}" + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def parse_run_config(data: Any, source: str = "config") -> RunConfig:
    """Validate a parsed YAML/JSON mapping; raise UserError with one line naming the field."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of fields (run_id, model, ...), got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise UserError(f"{source}: {_describe(error)}") from None


def load_run_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise UserError(f"{path} is {path.stat().st_size} bytes, not a run config (a page of YAML); see configs/ "
                            "for examples")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; see configs/ for examples") from None
    except OSError as error:
        raise UserError(f"cannot read config file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file (a YAML run config is UTF-8 text); see configs/ for "
                        "examples") from None
    if "\x00" in text:
        raise UserError(f"{path} is not a text file (it holds NUL bytes); give the run's YAML config")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    return parse_run_config(data, source=str(path))


def dump_run_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
