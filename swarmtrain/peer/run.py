"""`swarmtrain peer`: join the run, take the role the run and the flags call for, and leave cleanly.

Roles (``ROLES``) are classes built from (joined swarm, options, status, machine) with ``run()`` --
train or serve until done, or until a stop signal raises StopRequested -- and ``close()``, which always
runs and saves what must not be lost. A split run's roles (``privacy.split``) live with the privacy
code; everything else here knows nothing about them but their names.
"""
from __future__ import annotations

import logging
from typing import Optional

from swarmtrain.monitoring.status import PeerStatus
from swarmtrain.net.join import join_swarm
from swarmtrain.peer.options import PeerOptions
from swarmtrain.peer.resources import resolve_machine
from swarmtrain.signals import StopRequested, exit_now, raise_on_stop_signals, stop_repeated

logger = logging.getLogger("swarmtrain.peer")


def _trainer(*args):
    from swarmtrain.peer.trainer import Trainer

    return Trainer(*args)


def _trunk_host(*args):
    from swarmtrain.privacy.trunk_host import TrunkHostRole

    return TrunkHostRole(*args)


def _data_owner(*args):
    from swarmtrain.privacy.data_owner import DataOwnerRole

    return DataOwnerRole(*args)


# role name -> a factory of role objects (imported when used: each role pulls in its own dependencies)
ROLES = {"trainer": _trainer, "trunk": _trunk_host, "data-owner": _data_owner}


def role_for(config, requested: str) -> str:
    """The role this peer takes: a split run's trainer is a trunk host (its default role there)."""
    if config.privacy.split is not None and requested == "trainer":
        return "trunk"
    return requested


def run_peer(options: PeerOptions, access=None) -> dict:
    """Train until --max-epochs or a stop signal; returns the final status (also in --status-file).

    :param options: the volunteer's flags
    :param access: on a token-gated run, the LocalAccess built from the volunteer's token; None otherwise
    """
    options.check()
    machine = resolve_machine(options.device, options.precision)  # flags the machine cannot honour fail first
    status = PeerStatus()
    raise_on_stop_signals()
    swarm = role = None
    try:
        swarm = join_swarm(initial_peers=options.initial_peers, host_maddrs=options.host_maddrs,
                           announce_maddrs=options.announce_maddrs, identity=options.identity,
                           client_mode=options.client_mode, listen_port=options.port, run_id=options.run_id,
                           access=access)
        status.update(run_id=swarm.config.run_id, peer_id=str(swarm.dht.peer_id), device=str(machine.device),
                      client_mode=swarm.client_mode)
        role = ROLES[role_for(swarm.config, options.role)](swarm, options, status, machine)
        role.run()
        status.phase = "finished"
    except StopRequested as stop:
        logger.info(f"{stop.args[0]} received: saving and leaving the swarm (a second Ctrl+C or SIGTERM skips "
                    "the clean-up after the save)")
        status.phase = "stopped"
    finally:
        _leave(role, swarm)
    return status.to_dict()


def _leave(role, swarm) -> None:
    """The role saves what must not be lost, then the peer leaves the swarm. When the role could not
    hand over cleanly (a second stop signal; its helper processes already killed by a signal to the
    whole process group), the process ends right after the save: the interpreter's teardown would
    wait for helpers that nobody shut down."""
    handed_over = True
    try:
        if role is not None:
            handed_over = role.close() is not False
    except StopRequested:
        handed_over = False
    if stop_repeated() or not handed_over:
        logger.info("left without the clean-up: the state is saved, the helper processes end with this one")
        exit_now(0)
    try:
        if swarm is not None:
            swarm.leave()
    except StopRequested:
        exit_now(0)  # a second stop signal while the DHT shuts down
