"""Joining the Ray cluster that serves a model's experts, and finding its devices."""

from __future__ import annotations

import dataclasses
import socket
from typing import Any

from ..errors import ClusterError

RESOURCE = "edgemoe"  # the custom resource a node offers to serve experts
HOW_TO_START = (
    "start the head on this machine with `ray start --head`, then join each device with "
    "`ray start --address=HEAD_IP:6379 --resources='{\"edgemoe\": 1}'`"
)


@dataclasses.dataclass(frozen=True)
class Node:
    """A live Ray node that offers the `edgemoe` resource: one device."""

    id: str  # Ray's hex node id
    address: str  # its IP address
    cpus: int  # the CPUs it offers Ray

    @property
    def name(self) -> str:
        """How stats and the assignment name the device: its address and the start of its id."""
        return f"{self.address}/{self.id[:8]}"


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of "host:port" or "ray://host:port"; None for "auto"."""
    if address == "auto":
        return None
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterError(
            f"cluster address {address!r} is not 'auto', 'HOST:PORT' or 'ray://HOST:PORT' (e.g. 192.168.1.10:6379)"
        )
    return host, int(port)


def connect(address: str, timeout_s: float = 5.0) -> bool:
    """Connect this process to the Ray cluster at `address` ("auto": the one started on this
    machine; "HOST:PORT": its head; "ray://HOST:PORT": through Ray Client). True when this
    call made the connection (so its owner ends it); False when one was already open."""
    try:
        import ray  # an optional dependency (the `cluster` extra): imported only when a cluster is used
    except ImportError:
        raise ClusterError("a cluster needs Ray: pip install 'edgemoe[cluster]'") from None
    if ray.is_initialized():
        return False
    hp = _host_port(address)
    if hp is not None:  # a quick answer for an address nobody listens on, before Ray's long retries
        try:
            socket.create_connection(hp, timeout=timeout_s).close()
        except OSError as e:
            raise ClusterError(
                f"no Ray cluster answers at {address} (tried {hp[0]}:{hp[1]}: {e}): {HOW_TO_START}"
            ) from None
    try:
        ray.init(address=address, logging_level="warning", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(f"cannot join a Ray cluster at {address!r} ({e}): {HOW_TO_START}") from None
    return True


def device_nodes() -> list[Node]:
    """The live nodes that offer the `edgemoe` resource, by id."""
    import ray  # optional dependency, see connect

    nodes: list[dict[str, Any]] = ray.nodes()
    return sorted(
        (
            Node(n["NodeID"], n.get("NodeManagerAddress", "?"), int(n["Resources"].get("CPU", 0)))
            for n in nodes
            if n.get("Alive") and n.get("Resources", {}).get(RESOURCE, 0) > 0
        ),
        key=lambda n: n.id,
    )


def node_alive(node_id: str) -> bool:
    import ray  # optional dependency, see connect

    return any(n["NodeID"] == node_id and n.get("Alive") for n in ray.nodes())
