"""Networking: joining the swarm's DHT, this node's identity and addresses, the signed run config in
the DHT, the swarm's progress records, and whether other peers can dial this node.

- ``dht``: starting a DHT node (one-line errors for unreachable or malformed addresses) and keeping
  its neighbourhood fresh;
- ``identity``: the private key file that fixes a node's peer ID;
- ``addresses``: multiaddrs from the user's flags (--initial-peers, --port, --public-ip);
- ``run_config``: the run config the coordinator publishes, signed, and peers fetch;
- ``progress``: hivemind's progress records, read without dead peers';
- ``reachability``: dial-back checks, and the fallback to client mode behind NAT.
"""
