"""Connect to Ray (RAY_ADDRESS, --ray-address, or a local cluster) and size the encoder actors."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import ray

LOCAL_OBJECT_STORE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class ActorPlan:
    """How many encoder actors, and what each one asks Ray for."""

    workers: int
    num_gpus: float
    num_cpus: float

    @property
    def threads(self) -> int:
        return max(1, int(self.num_cpus))


def connect(address: str | None = None) -> None:
    """Join the given cluster or RAY_ADDRESS; otherwise start a fresh local one (the embedded default)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        local_token_auth()
        ray.init(
            address="local",
            include_dashboard=False,
            object_store_memory=int(os.environ.get("EMBEDPIPE_OBJECT_STORE_BYTES", LOCAL_OBJECT_STORE_BYTES)),
            **kwargs,
        )


def local_token_auth() -> None:
    """Token authentication for the local cluster we start, said explicitly so that Ray does not warn.

    Ray 2.5x turns token authentication on for a new local cluster when ``RAY_AUTH_MODE`` is unset, and
    warns on every run that it did. We make the same choice ourselves: ``RAY_AUTH_MODE=token`` for this
    process and the cluster's processes (they inherit the environment), with Ray's token file
    (``~/.ray/auth_token``, created by Ray when missing), so that another process of this user joins the
    cluster with ``RAY_AUTH_MODE=token``. An explicit ``RAY_AUTH_MODE`` (e.g. ``disabled``, as the tests
    set for multi-node clusters) is left as it is. Ray reads the mode once, when ``ray`` is imported, so
    its configuration is refreshed as Ray itself does when it makes this choice.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._private.authentication import authentication_token_setup as token_setup
    except ImportError:  # a Ray without token authentication: nothing to say
        return
    enable = getattr(token_setup, "_enable_token_auth", None)
    if enable is not None:
        enable()  # sets RAY_AUTH_MODE=token and refreshes Ray's cached configuration
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray._raylet import Config

    Config.initialize("")


def plan_actors(workers: int | None = None, cpus_per_worker: int | None = None) -> ActorPlan:
    """One actor per GPU when the cluster has GPUs; else ``workers`` CPU actors sharing the CPUs.

    A GPU actor asks for ``cpus_per_worker`` CPUs (default: the CPUs per GPU of the GPU nodes, at least
    2 where a node has them) for its host work: reading, tokenizing in parallel, padding, writing.
    More CPU workers than CPUs share them (1/k CPU each, so k fit on every CPU) rather than wait forever
    for CPUs that do not exist; a cluster with no CPUs yet (an autoscaler still adding nodes) gets
    one CPU per actor. An explicit ``cpus_per_worker`` is what each actor asks for.
    """
    if cpus_per_worker is not None and cpus_per_worker < 1:
        raise ValueError(f"cpus_per_worker must be at least 1, got {cpus_per_worker}")
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        count = min(workers or gpus, gpus)
        return ActorPlan(workers=count, num_gpus=1, num_cpus=cpus_per_worker or gpu_host_cpus())
    count = max(1, workers or 1)
    if cpus_per_worker is not None:
        return ActorPlan(workers=count, num_gpus=0, num_cpus=cpus_per_worker)
    cpus = int(resources.get("CPU", 0))
    if 0 < cpus < count:
        return ActorPlan(workers=count, num_gpus=0, num_cpus=1 / math.ceil(count / cpus))
    largest_node = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1)
    per_actor = max(1, min(cpus // count, largest_node))
    return ActorPlan(workers=count, num_gpus=0, num_cpus=per_actor)


def gpu_host_cpus() -> int:
    """CPUs per GPU on the GPU nodes (the smallest share), at least 2 but never more than such a node has."""
    shares, smallest = [], None
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        node_gpus = int(node["Resources"].get("GPU", 0))
        node_cpus = int(node["Resources"].get("CPU", 0))
        if node_gpus:
            shares.append(node_cpus // node_gpus)
            smallest = node_cpus if smallest is None else min(smallest, node_cpus)
    if not shares:
        return 1
    return max(1, min(max(2, min(shares)), smallest or 1))


def describe_resources() -> str:
    """What the cluster has free, for errors about actors that cannot be placed."""
    free = ray.available_resources()
    total = ray.cluster_resources()
    return ", ".join(
        f"{name} {free.get(name, 0):g} of {total.get(name, 0):g} free" for name in ("CPU", "GPU")
    )
