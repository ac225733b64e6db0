"""Access control for token-gated runs (``access.mode: token``).

- ``tokens``: the tokens themselves (issue, parse, check; the user's --expires / --token inputs);
- ``authorizer``: a node's :class:`~swarmtrain.access.authorizer.LocalAccess` and the DHT's gate;
- ``guard``: the averaging gate (averagers refuse callers without a valid token).

Nothing here is process-wide state: the command that starts a node builds its LocalAccess and passes
it explicitly to the DHT (``make_dht(access=...)``) and to every averager factory.
"""
