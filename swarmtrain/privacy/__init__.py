"""Privacy for swarmtrain: distance correlation, the NoPeek privacy head, split contribution, audits.

Heavy pieces (hivemind RPC in `split`, matplotlib/skimage in `audits`) are imported lazily by their
modules, so `import swarmtrain.privacy` stays cheap for peers that leave privacy off.
"""
from .config import PrivacyConfig
from .dcor import distance_correlation, distance_correlation_sqr
from .head import PrivacyHead, PrivacyStats, attach_privacy_head

__all__ = ["PrivacyConfig", "PrivacyHead", "PrivacyStats", "attach_privacy_head", "distance_correlation",
           "distance_correlation_sqr"]
