"""The swarm simulator: N peers of a run in one process, training the run's model with the run's
optimizer and data, and averaging through the code the swarm itself uses -- selection, error
feedback, re-sparsification, value quantization and the wire encoder of ``compression/``, the
schedules, member records and outer step of ``averaging/`` -- with hivemind and the network replaced
by an exact in-memory reduction. Bytes are counted from the encoded messages.

For organisers choosing a compression, a density and a period before a run
(``swarmtrain simulate --config RUN.yaml --peers N``), and for the benchmarks that compare recipes over
budgets the real swarm cannot run on one machine (benchmarks/simulate*.py).

The peers' forward and backward passes can run in forked worker processes, one core each
(``SimulationOptions.workers``, ``--workers``; workers.py), with the same floats as in one process.

``tests/test_simulate_fidelity.py`` checks the claim: a 3-peer simulation and a real 3-peer loopback
swarm of the same config and data order hold the same parameters after a few rounds.
"""
from swarmtrain.simulate.engine import Simulation, SimulationOptions, SimulationResult, simulate

__all__ = ["Simulation", "SimulationOptions", "SimulationResult", "simulate"]
