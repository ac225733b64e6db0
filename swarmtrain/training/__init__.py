"""What a peer trains and how it steps locally, shared by peers and the coordinator: the torch
optimizers and learning-rate schedule from the run config (``optimizers``), the frozen-variance
AdamW for sparse averaging (``frozen_adam``), parameter fingerprints that tell whether two peers hold
the same model (``fingerprint``), and atomic checkpoints (``checkpoint``).
"""
