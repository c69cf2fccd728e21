"""One model's experts across the devices of a Ray cluster (docs/cluster.md): the coordinator
keeps the backbone and runs every layer; each device serves the experts placed on it.
Placement of experts across devices (placement) and settings for one device from what it has
free (settings) are plain Python; the Ray runtime (moe, server, connect) imports ray only when
a cluster is used (`pip install 'edgemoe[cluster]'`)."""

from .moe import ClusterMoE, PlanFigures, attach, detach, format_cluster_stats, load_plan

__all__ = ["ClusterMoE", "PlanFigures", "attach", "detach", "format_cluster_stats", "load_plan"]
