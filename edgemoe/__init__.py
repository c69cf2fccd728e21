"""edgemoe: Mixture-of-Experts inference with experts streamed from flash into a RAM cache."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from . import _core as _core  # the native core, re-exported
from .cluster import PlanFigures, attach
from .cluster.moe import DEFAULT_PATH, DEFAULT_TIMEOUT_S, RETRY_S
from .cluster.placement import Plan
from .errors import (
    BudgetError,
    CheckpointError,
    ClusterError,
    CorruptExpertError,
    EdgeMoEError,
    ExpertReadError,
    MixtureError,
    ModelDirectoryError,
    TokenizerError,
    UnsupportedArchitectureError,
)
from .runtime import engine
from .runtime.engine import Model
from .runtime.options import StreamOptions

if TYPE_CHECKING:
    from .mixture.runtime import Mixture

__version__ = "0.1.0"


def load(
    path: str | os.PathLike[str],
    memory_budget: int | str | None = None,
    options: StreamOptions | None = None,
    *,
    threads: int | None = None,
    cluster: str | None = None,
    cluster_timeout: float = DEFAULT_TIMEOUT_S,
    device_memory: int | str | None = None,
    cluster_plan: Plan | str | os.PathLike[str] | None = None,
    cluster_figures: PlanFigures | None = None,
    cluster_retry: float = RETRY_S,
    cluster_path: str = DEFAULT_PATH,
    **stream: Any,
) -> Model:
    """Open a converted model directory.

    memory_budget bounds the RAM used for expert weights: bytes, or a string like "1.5GB"
    (powers of 1000) or "512MiB" (powers of 1024). None keeps every expert that was read.
    options: how experts are streamed (StreamOptions: policy, prefetch, preload, fallback,
    device, ...); any of its fields may also be given as a keyword, which replaces that field:
    load(path, "300MB", prefetch="lookahead"). threads: compute threads (default: all cores).

    cluster: serve the experts from the devices of a Ray cluster as well (docs/cluster.md):
    "auto" (the cluster started on this machine), "HOST:PORT" (its head) or "ray://HOST:PORT".
    This process keeps the backbone and the experts no device holds; the tokens are the ones
    it would compute alone. cluster_timeout: seconds a layer waits for a device before
    computing its experts here and marking it down. device_memory: bytes of experts per device
    (default: half of each device's available RAM). cluster_plan: follow this placement plan
    (a Plan or the file `edgemoe cluster plan --json` writes) instead of planning from the
    devices measured; cluster_figures: take the plan's figures from profiles (PlanFigures).
    cluster_retry: seconds before a device marked down is tried again (doubling each time).
    cluster_path: how each layer's call travels to a device: "socket" (a TCP connection each
    device's server opens, the default) or "ray" (a Ray actor call).
    Model.close() leaves the cluster.
    """
    model = engine.load(path, memory_budget, options, threads=threads, **stream)
    if cluster is not None:
        attach(
            model,
            cluster,
            timeout_s=cluster_timeout,
            device_memory=device_memory,
            plan=cluster_plan,
            figures=cluster_figures,
            retry_s=cluster_retry,
            path=cluster_path,
        )
    return model


def load_mixture(path: str | os.PathLike[str], **kwargs: Any) -> Mixture:
    """Open a mixture directory (docs/mixture.md): several specialist models and a gate, used as
    one model (generate, logits, stats; plan enables the specialists that fit budgets).
    Keywords as edgemoe.mixture.runtime.load: cluster, devices, link, timeout_s, threads."""
    from .mixture.runtime import load as load_mix  # deferred: the gate needs onnxruntime

    return load_mix(path, **kwargs)


__all__ = [
    "load",
    "load_mixture",
    "Model",
    "StreamOptions",
    "EdgeMoEError",
    "CheckpointError",
    "UnsupportedArchitectureError",
    "ModelDirectoryError",
    "CorruptExpertError",
    "ExpertReadError",
    "BudgetError",
    "TokenizerError",
    "ClusterError",
    "MixtureError",
    "__version__",
]
