"""Gradient compression for swarm averaging.

- ``spec``: the ``averaging.compression`` value (none, fp16, topk/randomk/gaussiank:RHO[+8bit]);
- ``selection``: the sparsifiers (GaussianK, exact top-k, random-k), O(d) and sort-free;
- ``feedback``: error feedback and the density warm-up schedule;
- ``wire``: the compact, versioned encoding of a sparse part (indices + rounded values);
- ``robust``: the checks and robust aggregation every reducer runs on the parts it receives;
- ``sparse_round``: one sparse all-reduce round (senders, re-sparsifying reducers, residuals);
- ``averager``: hivemind gradient averagers (the sparse one, byte-counting dense ones);
- ``factory``: ``make_averager_factory(spec, ...)``, the ``grad_averager_factory`` for hivemind.Optimizer;
- ``stats``: what an averager measured, shared with the training process.

Only ``spec`` is light to import (config parsing); the others import torch, and ``averager`` /
``factory`` / ``sparse_round`` import hivemind.
"""
