"""Ray cohort vs the local backend: step time split into compute and exchange,
bytes moved per step, and throughput ratios.

2-peer cyclic AMLN cohort of ResNet-20s, batch 128, Fashion-MNIST shapes (seeded
synthetic 1x28x28 images: content does not change the cost), one CPU per peer.

- compute: time each peer spends inside publish + learn (measured in the peer);
- exchange: the rest of the Ray step (serialising messages into the object store,
  fetching them as learn's arguments, scheduling), i.e. wall time per step minus
  the busiest peer's compute;
- sequential: the local backend running the same peers one after the other in one
  process, with 1 and with 2 torch threads.

    python tools/bench_ray.py [--steps 30] [--warmup 5] [--transports default,zero_copy]
                              [--set run.precision=bf16 ...]
                              [--ray-configs "default;task_events_report_interval_ms=0"]

``--set`` overrides config keys of every variant (plain processes included);
``--ray-configs`` compares Ray system configs (``ray.init(_system_config=...)``), one
fresh Ray instance each, separated by ';' (``default`` is Ray's own).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time

os.environ.setdefault("COHORT_PROGRESS", "0")

import bench_step  # noqa: E402  (tools/ is on sys.path when a tool runs)
import ray  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from cohort.backends import LocalBackend, RayBackend  # noqa: E402
from cohort.config import load_config  # noqa: E402
from cohort.coordinator import Cohort, StepTotals  # noqa: E402
from cohort.peer import Peer  # noqa: E402

BASE = [
    "method.name=amln",
    "method.rampup_epochs=0",
    "method.rampup_min_steps=0",
    "cohort.size=2",
    "cohort.cpus_per_peer=1",
    "data.name=synthetic",
    "data.train_subset=null",
    "data.synthetic.image_size=28",
    "data.synthetic.train_size=8192",
    "data.synthetic.test_size=16",
    "data.batch_size=128",
    "optim.milestones=[]",
]
TRANSPORTS = {  # name: (peer environment, message wire form)
    "default": ({}, "torch"),  # Ray pickles torch tensors through torch's own reducer
    "zero_copy": ({"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}, "torch"),  # Ray's out-of-band uint8 views
    "numpy": ({}, "numpy"),  # Message.to_wire: numpy arrays, out of band (what cohort uses)
}


class TimedPeer(Peer):
    """A Peer that records the seconds spent inside publish and learn."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.compute: list[float] = []

    def publish(self, step):
        start = time.perf_counter()
        message = super().publish(step)
        self.compute.append(time.perf_counter() - start)
        return message

    def learn(self, step, *teachers):
        start = time.perf_counter()
        out = super().learn(step, *teachers)
        self.compute[-1] += time.perf_counter() - start
        return out

    def take_compute(self) -> list[float]:
        times, self.compute = self.compute, []
        return times


class TorchWireTimedPeer(TimedPeer):
    """Sends messages as torch tensors (before Message.to_wire was adopted)."""

    send_numpy = False


def measure(cohort: Cohort, steps: int, warmup: int) -> tuple[float, float]:
    """(wall seconds per step, busiest peer's compute seconds per step)."""
    teachers = [cohort.pairing.teachers(j, cohort.size, 0) for j in range(cohort.size)]
    backend = cohort.backend
    cohort.run_steps(range(warmup), teachers, [StepTotals() for _ in range(cohort.size)])
    backend.get([backend.call(j, "take_compute") for j in range(cohort.size)])
    start = time.perf_counter()
    cohort.run_steps(range(warmup, warmup + steps), teachers, [StepTotals() for _ in range(cohort.size)])
    wall = (time.perf_counter() - start) / steps
    compute = backend.get([backend.call(j, "take_compute") for j in range(cohort.size)])
    return wall, max(statistics.fmean(c) for c in compute)


def independent_peer_step(steps: int, overrides: tuple[str, ...] = (), warmup: int = 3) -> float:
    """Mean publish + learn seconds of one AMLN peer, 1 thread, no exchange (a mean,
    like the Ray cohort's wall time per step, so the two compare like for like)."""
    torch.set_num_threads(1)
    learner, teacher = bench_step.build(["method.name=amln", *overrides])
    times = [bench_step.timed_step(learner, teacher, step) for step in range(warmup + steps)]
    return statistics.fmean(times[warmup:])


def parse_ray_config(text: str) -> dict:
    """'key=value,key=value' (values read as YAML scalars) or 'default' -> _system_config."""
    if text.strip() == "default":
        return {}
    pairs = (item.split("=", 1) for item in text.split(",") if item.strip())
    return {key.strip(): yaml.safe_load(value) for key, value in pairs}


def driver(config, backend) -> Cohort:
    cohort = Cohort(config, run_dir=".", log=lambda line: None)
    cohort.start_backend(backend)
    return cohort


def message_bytes(dtype: str, overrides: tuple[str, ...] = ()) -> int:
    config = load_config(None, [*BASE, *overrides, f"cohort.transport_dtype={dtype}", "cohort.backend=local"])
    peer = Peer(0, config)
    return peer.publish(0).from_wire().nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    parser.add_argument("--dtypes", default="auto,float32,bfloat16", help="cohort.transport_dtype values")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for every variant")
    parser.add_argument("--ray-configs", default="default", help="Ray _system_configs to compare, ';'-separated")
    args = parser.parse_args()
    overrides = tuple(args.set)

    for dtype in args.dtypes.split(","):
        per_message = message_bytes(dtype, overrides)
        print(f"bytes per step, {dtype}: {per_message / 2**20:.2f} MiB per message x 2 peers = "
              f"{2 * per_message / 2**20:.2f} MiB")  # fmt: skip

    # The parallel ceiling: two peers' compute in two processes at once, no Ray, no exchange.
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        alone = independent_peer_step(args.steps, overrides)
        together = max(pool.starmap(independent_peer_step, [(args.steps, overrides)] * 2))
    print(f"one AMLN peer step, 1 thread: alone {1000 * alone:.0f} ms; two processes side by side "
          f"{1000 * together:.0f} ms each (the 2-core parallel ceiling is {2 * alone / together:.2f}x)")  # fmt: skip

    rows = []
    for threads in (1, 2):
        config = load_config(None, [*BASE, *overrides, "cohort.backend=local", f"run.threads={threads}"])
        wall, _ = measure(driver(config, LocalBackend(config, TimedPeer)), args.steps, args.warmup)
        rows.append((f"local, sequential, {threads} thread(s)", "float32", wall, None))
    torch.set_num_threads(1)

    for ray_config in args.ray_configs.split(";"):
        system_config = parse_ray_config(ray_config)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _system_config=system_config)
        suffix = f" [{ray_config.strip()}]" if system_config else ""
        # The same single-peer loop inside one Ray worker, alone: Ray's worker environment's own cost.
        ray.cloudpickle.register_pickle_by_value(bench_step)  # workers cannot import tools/
        in_worker = ray.get(ray.remote(num_cpus=1)(independent_peer_step).remote(args.steps, overrides))
        print(f"one AMLN peer step, 1 thread, inside a Ray worker alone{suffix}: {1000 * in_worker:.0f} ms")
        for transport in args.transports.split(","):
            for dtype in args.dtypes.split(","):
                config = load_config(None, [*BASE, *overrides, "cohort.backend=ray", f"cohort.transport_dtype={dtype}"])
                env, wire = TRANSPORTS[transport]
                backend = RayBackend(config, TimedPeer if wire == "numpy" else TorchWireTimedPeer, actor_env=env)
                try:
                    wall, compute = measure(driver(config, backend), args.steps, args.warmup)
                finally:
                    backend.shutdown()
                rows.append((f"ray, {transport}{suffix}", dtype, wall, compute))
        ray.shutdown()

    sequential_1 = rows[0][2]
    sequential_2 = rows[1][2]
    print(f"\n2-peer AMLN ResNet-20, batch 128, 1x28x28; mean of {args.steps} steps after {args.warmup} warm-up")
    print("| backend | transport dtype | step (ms) | compute (ms) | exchange (ms) | exchange % | "
          "throughput vs seq. 1 thread | vs seq. 2 threads | vs 2 plain processes |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, dtype, wall, compute in rows:
        compute_cells = (
            f"{1000 * compute:.0f} | {1000 * (wall - compute):.0f} | {100 * (wall - compute) / wall:.1f}"
            if compute is not None
            else "- | - | -"
        )
        print(
            f"| {name} | {dtype} | {1000 * wall:.0f} | {compute_cells} | "
            f"{sequential_1 / wall:.2f} | {sequential_2 / wall:.2f} | {together / wall:.2f} |"
        )


if __name__ == "__main__":
    main()
