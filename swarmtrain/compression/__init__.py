"""Gradient compression for swarm averaging: sparsifiers, error feedback, the sparse wire format and
hivemind gradient averagers.

The averager module imports hivemind (slow); it is loaded lazily so that ``swarmtrain.compression.spec``
stays cheap to import for config parsing.
"""
from swarmtrain.compression.feedback import DensitySchedule, ErrorFeedbackSparsifier
from swarmtrain.compression.selection import SELECTORS, gaussiank, randomk, target_count, topk
from swarmtrain.compression.spec import CompressionSpec, parse_compression_spec
from swarmtrain.compression.stats import CompressionStats
from swarmtrain.compression.wire import WIRE_VERSION, WireFormatError, decode_sparse, encode_sparse

_LAZY = {"make_grad_averager_factory", "SparseGradientAverager", "CountingGradientAverager"}


def __getattr__(name):
    if name in _LAZY:
        from swarmtrain.compression import averager

        return getattr(averager, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
