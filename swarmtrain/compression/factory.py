"""``make_averager_factory``: the ``grad_averager_factory`` that hivemind.Optimizer builds its averager
with, from the run's compression spec.

Dense specs map to hivemind's GradientAverager (NoCompression / Float16Compression, with byte
counting and checked reductions); sparse ones to :class:`SparseGradientAverager`. A mixin (e.g. the
local mode's in-step check) goes in front of either class; on a token-gated run the access guard goes
in front of everything.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, Optional, Tuple

from hivemind.compression import Float16Compression, NoCompression

from swarmtrain.access.guard import with_access_guard
from swarmtrain.compression.averager import CountingGradientAverager, SparseGradientAverager
from swarmtrain.compression.feedback import DensitySchedule
from swarmtrain.compression.spec import CompressionSpec

_mixed_classes: Dict[Tuple[type, type], type] = {}


def with_mixin(mixin: Optional[type], cls: type) -> type:
    """`cls` with `mixin` in front (the same class for the same pair).

    The composed class keeps `cls`'s name: hivemind names an averager's RPC handlers after its class,
    and every peer of a run composes the same way."""
    if mixin is None:
        return cls
    if (mixin, cls) not in _mixed_classes:
        _mixed_classes[mixin, cls] = type(cls.__name__, (mixin, cls),
                                          {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _mixed_classes[mixin, cls]


def make_averager_factory(spec: CompressionSpec, *, density_schedule: Optional[DensitySchedule] = None,
                          access=None, mixin: Optional[type] = None, **averager_kwargs):
    """A ``grad_averager_factory`` for ``hivemind.Optimizer`` implementing a compression spec.

    :param spec: the run's compression (``averaging.compression``)
    :param density_schedule: a sparse spec's density per epoch (``DensitySchedule.for_spec``); None for
      a constant density
    :param access: on a token-gated run, this node's LocalAccess: the averager refuses averaging RPCs
      from peers without a valid token (None: an open run)
    :param mixin: a class to put in front of the averager class (its ``__init__`` takes its own keyword
      arguments and passes the rest on)
    :param averager_kwargs: passed to every averager the factory builds: options hivemind.Optimizer does
      not forward (``request_timeout``, ``bandwidth``), ``robust_policy``, ``max_sample_weight``,
      ``stats``, the mixin's arguments

    Either way the averager exposes ``.stats`` (:class:`~swarmtrain.compression.stats.CompressionStats`).
    """
    if spec.is_sparse:
        averager_class = with_access_guard(with_mixin(mixin, SparseGradientAverager), access)
        return partial(averager_class, spec=spec, density_schedule=density_schedule, **averager_kwargs)
    if density_schedule is not None:
        raise ValueError("a density schedule only applies to sparse compression specs")
    codec = Float16Compression() if spec.method == "fp16" else NoCompression()
    averager_class = with_access_guard(with_mixin(mixin, CountingGradientAverager), access)

    def dense_factory(*args, **kwargs):
        kwargs["compression"] = codec  # hivemind.Optimizer passes its grad_compression; the spec decides
        return averager_class(*args, **{**kwargs, **averager_kwargs})

    return dense_factory
