"""The `privacy` section of a run config (embedded by the run config as a pydantic v2 model)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The default defence, chosen from benchmarks/privacy_defences.py (BENCHMARKS.md, "Privacy"):
# NoPeek plus noise calibrated at the cut, NoPeek ramped up over the first 280 steps (20 digits epochs).
DEFAULT_ALPHA = 3.0
DEFAULT_CUT_NOISE = 1.0
DEFAULT_ADVERSARY_WEIGHT = 0.0
DEFAULT_WARMUP_STEPS = 280


class SplitConfig(BaseModel):
    """A split run (`privacy.split`): data owners keep the layers up to the cut, trunk peers host the rest.

    The model is the digits split task of swarmtrain.privacy.digits (64 inputs, 10 classes); the
    run config's `model` section is not used by a split run. See swarmtrain.privacy.swarm.
    """

    model_config = ConfigDict(extra="forbid")

    task: Literal["digits"] = Field(default="digits", description="the split task (digits: sklearn's 8x8 digits)")
    cut_width: int = Field(default=32, ge=1, le=4096, description="width of Z, the activations sent to the trunk")
    hidden: int = Field(default=256, ge=1, le=65536, description="hidden width of the owner's bottom layers")
    trunk_hidden: int = Field(default=256, ge=1, le=65536, description="hidden width of the trunk")
    lr: float = Field(default=1e-3, gt=0, allow_inf_nan=False, description="Adam learning rate, both sides")
    batch_size: int = Field(default=64, ge=2, le=1024, description="samples per data-owner step")
    average_every: float = Field(default=30.0, gt=0, allow_inf_nan=False,
                                 description="seconds between averaging rounds of the trunk hosts")
    averaging_timeout: float = Field(default=30.0, gt=0, allow_inf_nan=False,
                                     description="give up an averaging round of the trunk after this many seconds")


class PrivacyConfig(BaseModel):
    """NoPeek privacy head settings; see swarmtrain.privacy.head."""

    # unknown keys are almost always typos ("alpah"): reject them loudly
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="attach the privacy head (off: no hook, no extra compute)")
    cut_layer: Optional[str] = Field(
        default=None, min_length=1,
        description="dotted module path whose *output* is Z, the activations that may leave the data owner, "
                    "e.g. 'features.2' or 'transformer.h.0'")
    alpha: float = Field(default=DEFAULT_ALPHA, ge=0.0, allow_inf_nan=False,
                         description="NoPeek weight: loss = task_loss + alpha * dCor(X, Z)")
    cut_noise: float = Field(
        default=DEFAULT_CUT_NOISE, ge=0.0, le=100.0, allow_inf_nan=False,
        description="noise calibrated at the cut: what leaves is Z / rms(Z) + cut_noise * N(0, 1) (per sample); "
                    "0 releases Z unchanged")
    adversary_weight: float = Field(
        default=DEFAULT_ADVERSARY_WEIGHT, ge=0.0, allow_inf_nan=False,
        description="adversarial reconstruction: loss += adversary_weight * R^2 of a decoder Z -> X refitted every "
                    "step (0: no adversary)")
    warmup_steps: int = Field(
        default=DEFAULT_WARMUP_STEPS, ge=0,
        description="the alpha and adversary terms ramp up linearly over this many training steps "
                    "(full weight at once from a random init can collapse Z before it carries the label)")
    leakage_statistic: Literal["u", "v"] = Field(
        default="u",
        description="estimator of the *reported* leakage: 'u' = bias-corrected U-statistic (comparable across "
                    "batch sizes), 'v' = V-statistic (biased toward 1 at small batches)")
    split: Optional[SplitConfig] = Field(
        default=None, description="a split run: data owners send only Z to trunk peers (swarmtrain.privacy.swarm)")

    @field_validator("cut_layer")
    @classmethod
    def _cut_layer_is_a_module_path(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and any(not part.replace("_", "").isalnum() for part in value.split(".")):
            raise ValueError(f"must be a dotted module path like 'features.2', got {value!r}")
        return value

    @model_validator(mode="after")
    def _cut_layer_required_when_enabled(self) -> "PrivacyConfig":
        if self.split is not None:
            if self.cut_layer is not None:
                raise ValueError("privacy.cut_layer: a split run cuts where privacy.split puts the cut; remove "
                                 "privacy.cut_layer")
            return self
        if self.enabled and not self.cut_layer:
            raise ValueError("privacy.cut_layer is required when privacy.enabled is true "
                             "(a dotted module path such as 'features.2' or 'transformer.h.0')")
        return self
