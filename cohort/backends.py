"""Where peers run: in this process ("local", the reference) or one Ray actor each ("ray").

A backend is three calls (the ``Backend`` protocol): ``call(j, method, *args)`` returns
a handle (a value locally, an ObjectRef under Ray), ``get(handles)`` waits for their
values, ``shutdown()`` releases the peers. The driver (``cohort.coordinator``) never
knows which one it drives; the Ray backend matches the local one bit for bit.
"""

from __future__ import annotations

from typing import Any, Protocol

from .config import Config, ConfigError
from .peer import NonFiniteLossError, Peer


class PeerFailure(RuntimeError):
    """A peer actor died or raised; the cohort can be rebuilt from a checkpoint.

    ``secondary``: this peer failed only because another one did.
    """

    def __init__(self, message: str, secondary: bool = False) -> None:
        super().__init__(message)
        self.secondary = secondary


class ClusterGone(ConfigError):
    """The Ray cluster has no CPUs: at the start a resource error (exit 2); during a
    recovery, the cluster was stopped or lost (the driver stops with exit 1)."""


class Backend(Protocol):
    """How the driver reaches its peers."""

    name: str

    def call(self, j: int, method: str, *args: Any) -> Any: ...

    def get(self, handles: list[Any]) -> list[Any]: ...

    def shutdown(self) -> None: ...


class LocalBackend:
    """All peers in this process; calls run immediately and return values."""

    name = "local"

    def __init__(self, config: Config, peer_class: type[Peer] = Peer) -> None:
        self.peers = [peer_class(j, config, threads=config.run.threads) for j in range(config.cohort.size)]

    def call(self, j: int, method: str, *args: Any) -> Any:
        return getattr(self.peers[j], method)(*args)

    def get(self, handles: list[Any]) -> list[Any]:
        return handles

    def shutdown(self) -> None:
        self.peers = []


class RayBackend:
    """One Ray actor per peer, gang-scheduled with a placement group.

    Inside a Ray Tune trial the trial already holds a placement group with one bundle
    for its driver and one per peer (``tuning.trial``); peer j goes into bundle j + 1
    of that group. Elsewhere the backend creates its own group of one bundle per peer.
    Messages travel in ``Message.to_wire`` form (numpy arrays, moved out of band);
    ``actor_env`` adds environment variables to every actor (benchmarks use it to
    compare Ray's own tensor settings).
    """

    name = "ray"

    def __init__(self, config: Config, peer_class: type[Peer] = Peer, actor_env: dict[str, str] | None = None) -> None:
        import ray
        from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray, self._remove_pg = ray, remove_placement_group
        if not ray.is_initialized():
            ray.init()  # RAY_ADDRESS (set by `ray job submit`) or a new in-process instance
        cpus, gpus = self._resources(config)
        size = config.cohort.size
        self.group, self.owns_group, first_bundle = get_current_placement_group(), False, 1
        if self.group is not None:
            check_trial_bundles(self.group.bundle_specs, size, cpus, gpus)
        else:
            bundle = peer_bundle(cpus, gpus)
            self.group, self.owns_group, first_bundle = placement_group([bundle] * size, strategy="PACK"), True, 0
            ready, _ = ray.wait([self.group.ready()], timeout=120)
            if not ready:
                self.shutdown()
                raise ConfigError(
                    f"cohort: waited 120 s for {size} x {bundle} on the Ray cluster; "
                    "the resources exist but are held by other work"
                )
        remote_peer = ray.remote(peer_class)
        threads = max(1, int(cpus))
        self.actors = [
            remote_peer.options(
                num_cpus=cpus,
                num_gpus=gpus,
                max_restarts=0,
                runtime_env={"env_vars": actor_env} if actor_env else None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.group, placement_group_bundle_index=first_bundle + j
                ),
            ).remote(j, config, threads)
            for j in range(size)
        ]

    def _resources(self, config: Config) -> tuple[float, float]:
        ray = self._ray
        total = ray.cluster_resources()
        if total.get("CPU", 0.0) <= 0:
            raise ClusterGone("the Ray cluster has no CPUs left (it was stopped or lost)")
        nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
        return check_resources(config, total, nodes)

    def call(self, j: int, method: str, *args: Any) -> Any:
        return getattr(self.actors[j], method).remote(*args)

    def get(self, handles: list[Any]) -> list[Any]:
        """Values of ``handles`` (one per peer, in peer order); on failure, the root
        cause among all of them (see ``root_cause``)."""
        ray = self._ray
        try:
            return ray.get(handles)
        except ray.exceptions.RayError:
            errors = []
            for j, handle in enumerate(handles):  # fetch every one, so no failed result goes unhandled
                try:
                    ray.get(handle)
                except ray.exceptions.RayError as error:
                    errors.append(self._translate(error, j))
            raise root_cause(errors) from None

    def _translate(self, error: Exception, j: int) -> Exception:
        ray = self._ray
        if isinstance(error, ray.exceptions.RayActorError) and not isinstance(error, ray.exceptions.RayTaskError):
            return PeerFailure(f"peer {j}'s actor died ({type(error).__name__})")
        cause = getattr(error, "cause", None) or error
        if isinstance(cause, NonFiniteLossError):
            return cause
        if isinstance(cause, ray.exceptions.RayError):  # a message it needed was lost with its sender
            return PeerFailure(f"peer {j} lost a teacher's message ({type(cause).__name__})", secondary=True)
        first_line = str(cause).splitlines()[0] if str(cause) else ""
        return PeerFailure(f"peer {j} raised {type(cause).__name__}: {first_line}")

    def placement_groups(self) -> list[str]:
        """The placement group each peer's actor runs in (hex ids), asked of the actors."""
        ask = [
            a.__ray_call__.remote(lambda _: self._ray.get_runtime_context().get_placement_group_id())
            for a in self.actors
        ]
        return [str(group) for group in self._ray.get(ask)]

    def shutdown(self) -> None:
        for actor in getattr(self, "actors", []):
            self._ray.kill(actor)
        self.actors = []
        if getattr(self, "owns_group", False) and self.group is not None:
            self._remove_pg(self.group)
        self.group = None


def _placement_group_id(_peer: Any) -> str | None:
    """Runs inside a peer's actor (``__ray_call__``)."""
    import ray

    return ray.get_runtime_context().get_placement_group_id()


def peer_bundle(cpus: float, gpus: float) -> dict[str, float]:
    """The resources one peer actor asks for (and its placement-group bundle holds)."""
    return {"CPU": cpus} | ({"GPU": gpus} if gpus else {})


def root_cause(errors: list[Exception]) -> Exception:
    """The error to report from one step's failures: a peer whose own loss went
    non-finite before one that only read a non-finite teacher; a peer that died or
    raised before one that only lost its teacher's message."""
    non_finite = [e for e in errors if isinstance(e, NonFiniteLossError)]
    origins = [e for e in non_finite if not e.bad_teachers]
    primary = [e for e in errors if not getattr(e, "secondary", False)]
    return (origins or non_finite or primary or errors)[0]


def peer_gpus(config: Config, cluster_gpus: float) -> float:
    """GPUs per peer: ``cohort.gpus_per_peer``, or one each when the cluster has GPUs."""
    gpus = config.cohort.gpus_per_peer
    return gpus if gpus is not None else (1.0 if cluster_gpus >= 1 else 0.0)


def check_resources(config: Config, total: dict[str, float], nodes: list[dict[str, float]]) -> tuple[float, float]:
    """Per-peer (CPUs, GPUs); a one-line error naming the numbers if the cluster can
    never fit the cohort (so the run fails at once instead of waiting forever)."""
    c = config.cohort
    have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
    gpus = peer_gpus(config, have_gpu)
    need_cpu, need_gpu = c.size * c.cpus_per_peer, c.size * gpus
    if need_cpu > have_cpu + 1e-9:
        raise ConfigError(
            f"cohort.cpus_per_peer: {c.size} peers x {c.cpus_per_peer:g} CPU = {need_cpu:g} CPUs, but the "
            f"Ray cluster has {have_cpu:g}; lower cohort.cpus_per_peer (e.g. {have_cpu / c.size:g}) or cohort.size"
        )
    if need_gpu > have_gpu + 1e-9:
        raise ConfigError(
            f"cohort.gpus_per_peer: {c.size} peers x {gpus:g} GPU = {need_gpu:g} GPUs, but the Ray cluster "
            f"has {have_gpu:g}; set cohort.gpus_per_peer=0 for CPU or a fraction to share GPUs"
        )
    if nodes and not any(n.get("CPU", 0) >= c.cpus_per_peer and n.get("GPU", 0) >= gpus for n in nodes):
        raise ConfigError(
            f"cohort.cpus_per_peer: no single Ray node has {c.cpus_per_peer:g} CPUs and {gpus:g} GPUs for one peer"
        )
    return c.cpus_per_peer, gpus


def check_trial_bundles(bundles: list[dict[str, float]], size: int, cpus: float, gpus: float) -> None:
    """Inside a Tune trial: bundle 0 is the trial's driver, bundles 1..size its peers."""
    peers = bundles[1:]
    fits = len(peers) >= size and all(
        b.get("CPU", 0) >= cpus - 1e-9 and b.get("GPU", 0) >= gpus - 1e-9 for b in peers[:size]
    )
    if not fits:
        raise ConfigError(
            f"cohort: this process runs in a placement group of bundles {bundles}, which does not hold "
            f"a driver bundle plus {size} peer bundles of {{CPU: {cpus:g}, GPU: {gpus:g}}}"
        )


BACKENDS: dict[str, type[LocalBackend] | type[RayBackend]] = {"local": LocalBackend, "ray": RayBackend}
