"""Privacy for swarmtrain: distance correlation, the NoPeek privacy head, split contribution, audits.

Every piece is imported when first used (PEP 562 ``__getattr__``): `import swarmtrain.privacy` (the
`swarmtrain audit` command's package) costs nothing, so `swarmtrain --help` does not load torch.
"""
from importlib import import_module

_EXPORTS = {
    "PrivacyConfig": ".config", "PrivacyHead": ".head", "PrivacyStats": ".head", "attach_privacy_head": ".head",
    "distance_correlation": ".dcor", "distance_correlation_sqr": ".dcor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
