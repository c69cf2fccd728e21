"""One model's experts across the devices of a Ray cluster (docs/cluster.md): the coordinator
keeps the backbone and runs every layer; each device serves the experts placed on it.

Ray is an optional dependency (`pip install 'edgemoe[cluster]'`), imported only when a
cluster is used."""

from .moe import ClusterMoE, assign_experts, attach, detach, format_cluster_stats

__all__ = ["ClusterMoE", "assign_experts", "attach", "detach", "format_cluster_stats"]
