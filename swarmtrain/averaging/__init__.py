"""How peers average: hivemind.Optimizer set up from the run config.

- ``sync``: ``averaging.mode: sync`` (DeDLOC): gradients accumulated to the swarm's target batch,
  averaged, and every peer steps together; every round also compares parameter fingerprints;
- ``local``: ``averaging.mode: local``: peers step on their own and average their model delta at
  the points the schedule picks (local SGD / DiLoCo-style outer step);
- ``schedule``: when local mode averages (``constant:H``, ``adaptive``), as pure functions;
- ``rounds``: the record of every averaging round (the display, the demo and tests read it);
- ``progress``: hivemind's progress tracker with fewer, better-timed reports;
- ``factory``: ``make_optimizer(config, ...)``, the one entry point, for either mode.
"""
