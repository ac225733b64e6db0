"""The `privacy` section of a run config (embedded by the run config as a pydantic v2 model)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class PrivacyConfig(BaseModel):
    """NoPeek privacy head settings; see swarmtrain.privacy.head."""

    # unknown keys are almost always typos ("alpah"): reject them loudly
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="attach the privacy head (off: no hook, no extra compute)")
    cut_layer: Optional[str] = Field(
        default=None, min_length=1,
        description="dotted module path whose *output* is Z, the activations that may leave the data owner, "
                    "e.g. 'features.2' or 'transformer.h.0'")
    alpha: float = Field(default=0.0, ge=0.0, allow_inf_nan=False,
                         description="NoPeek weight: loss = task_loss + alpha * dCor(X, Z)")
    leakage_statistic: Literal["u", "v"] = Field(
        default="u",
        description="estimator of the *reported* leakage: 'u' = bias-corrected U-statistic (comparable across "
                    "batch sizes), 'v' = V-statistic (biased toward 1 at small batches)")

    @field_validator("cut_layer")
    @classmethod
    def _cut_layer_is_a_module_path(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and any(not part.replace("_", "").isalnum() for part in value.split(".")):
            raise ValueError(f"must be a dotted module path like 'features.2', got {value!r}")
        return value

    @model_validator(mode="after")
    def _cut_layer_required_when_enabled(self) -> "PrivacyConfig":
        if self.enabled and not self.cut_layer:
            raise ValueError("privacy.cut_layer is required when privacy.enabled is true "
                             "(a dotted module path such as 'features.2' or 'transformer.h.0')")
        return self
