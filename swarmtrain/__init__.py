"""swarmtrain: volunteer-computing collaborative training over a hivemind swarm."""
__version__ = "0.1.0"
