"""The Ray backend: same maths as the local one, resources, faults, resume."""

from __future__ import annotations

import json
import re

import pytest
import torch

from cohort.callbacks import OnStep
from cohort.checkpoint import latest_checkpoint, load_checkpoint
from cohort.config import ConfigError
from cohort.coordinator import Cohort, prepare_run_dir, train

from helpers import kill_peer, quiet, synthetic_config, tree_digest

pytestmark = pytest.mark.ray


@pytest.fixture
def one_thread():
    """Peers of the local backend set this process's torch threads; put them back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def final_weights(run_dir) -> list[dict[str, torch.Tensor]]:
    states, _ = load_checkpoint(latest_checkpoint(run_dir))
    return [state["model"] | {f"extras.{k}": v for k, v in state["extras"].items()} for state in states]


def assert_same_weights(a, b, atol: float = 1e-6) -> None:
    assert len(a) == len(b)
    for peer_a, peer_b in zip(a, b):
        assert peer_a.keys() == peer_b.keys()
        for name in peer_a:
            torch.testing.assert_close(peer_a[name], peer_b[name], rtol=0, atol=atol, msg=name)


def alive_actors() -> list:
    import ray

    return [a for a in ray._private.state.actors().values() if a["State"] == "ALIVE"]


EQUALITY_CASES = {
    "dml-2": ["method.name=dml", "cohort.size=2"],
    "dml-3": ["method.name=dml", "cohort.size=3"],
    "amln-2": ["method.name=amln", "cohort.size=2"],
    "amln-3": ["method.name=amln", "cohort.size=3"],
    "amln-2-bf16": ["method.name=amln", "cohort.size=2", "run.precision=bf16"],  # what auto picks on bf16 CPUs
    "amln-2-fp32": ["method.name=amln", "cohort.size=2", "run.precision=fp32"],
    "mcl-3-all_pairs": [
        "method.name=mcl",
        "cohort.size=3",
        "cohort.pairing=all_pairs",
        "data.sampler=class_balanced",
        "data.per_class=4",
    ],
    "lmcl-3-all_pairs": [
        "method.name=lmcl",
        "cohort.size=3",
        "cohort.pairing=all_pairs",
        "data.sampler=class_balanced",
        "data.per_class=4",
        "method.meta_every=2",  # meta steps at steps 0 and 2 of each epoch
    ],
}


@pytest.mark.usefixtures("ray_session", "one_thread")
@pytest.mark.parametrize("case", sorted(EQUALITY_CASES))
def test_ray_backend_matches_local_backend(case, tmp_path):
    common = [
        *EQUALITY_CASES[case],
        "cohort.cpus_per_peer=0.5",  # 3 peers fit on 2 CPUs; still one torch thread each
        "run.threads=1",
        "optim.epochs=2",
        "optim.milestones=[1]",
    ]
    train(synthetic_config(tmp_path / "local", *common, "cohort.backend=local"), log=quiet)
    train(synthetic_config(tmp_path / "ray", *common, "cohort.backend=ray"), log=quiet)
    local, remote = final_weights(tmp_path / "local" / "run"), final_weights(tmp_path / "ray" / "run")
    assert_same_weights(local, remote)
    assert not all(torch.equal(local[0][k], local[1][k]) for k in local[0] if k.startswith("fc"))  # peers differ


@pytest.mark.usefixtures("ray_session")
def test_cohort_too_big_for_the_cluster_fails_at_once_without_actors(tmp_path):
    config = synthetic_config(tmp_path, "cohort.backend=ray", "cohort.size=5", "cohort.cpus_per_peer=1")
    with pytest.raises(ConfigError, match=r"5 peers x 1 CPU = 5 CPUs, but the Ray cluster has 2"):
        train(config, log=quiet)
    assert alive_actors() == []
    assert not (tmp_path / "run").exists()


@pytest.mark.usefixtures("ray_session")
def test_more_gpus_than_the_cluster_has_is_a_clear_error(tmp_path):
    config = synthetic_config(tmp_path, "cohort.backend=ray", "cohort.gpus_per_peer=1")
    with pytest.raises(ConfigError, match=r"cohort.gpus_per_peer: 2 peers x 1 GPU = 2 GPUs, but the Ray cluster has 0"):
        train(config, log=quiet)


@pytest.mark.usefixtures("ray_session")
def test_killed_peer_is_rebuilt_from_the_checkpoint_and_ends_like_an_uninterrupted_run(tmp_path):
    options = ["cohort.backend=ray", "optim.epochs=3", "optim.milestones=[2]", "method.name=amln"]
    train(synthetic_config(tmp_path / "clean", *options), log=quiet)

    config = synthetic_config(tmp_path / "killed", *options)
    lines: list[str] = []
    cohort = Cohort(config, prepare_run_dir(config, resume=False), log=lines.append)
    killed: list[int] = []

    def kill_peer_one_mid_epoch_two(step: int) -> None:
        steps_per_epoch = cohort.describe["steps_per_epoch"]
        if not killed and step == steps_per_epoch + 1:  # epoch 2, second step
            killed.append(kill_peer(cohort, 1))

    cohort.callbacks.append(OnStep(kill_peer_one_mid_epoch_two))
    cohort.fit()
    assert killed, "the peer was never killed"
    assert cohort.failures == 1
    recoveries = [line for line in lines if "rebuilding the cohort" in line]
    assert len(recoveries) == 1, recoveries
    assert "peer 1's actor died" in recoveries[0] and "from epoch_001" in recoveries[0], recoveries
    assert_same_weights(final_weights(tmp_path / "clean" / "run"), final_weights(tmp_path / "killed" / "run"), 0)


def set_learning_rate_in_checkpoint(checkpoint, peer: int, lr: float) -> None:
    """Make one peer's saved optimizer diverge when the run resumes from it."""
    from cohort.checkpoint import read_safetensors, write_safetensors

    path = checkpoint / f"peer_{peer}.train.safetensors"
    tensors, header = read_safetensors(path)
    skeleton = json.loads(header["skeleton"])
    for group in skeleton["optimizer"]["param_groups"]:
        group["lr"] = group["initial_lr"] = lr
    write_safetensors(path, tensors, {"skeleton": json.dumps(skeleton)})


@pytest.mark.usefixtures("ray_session")
def test_non_finite_loss_stops_the_run_naming_peer_and_step_and_keeps_the_last_checkpoint(tmp_path, capsys):
    from cohort.run import main

    run_dir = tmp_path / "run"
    options = ["cohort.backend=ray", "data.synthetic.train_size=128", "optim.milestones=[]"]
    train(synthetic_config(tmp_path, *options, "optim.epochs=1"), log=quiet)
    set_learning_rate_in_checkpoint(run_dir / "checkpoints" / "epoch_001", peer=1, lr=1e38)
    before = tree_digest(run_dir / "checkpoints" / "epoch_001")

    assert main(["--resume", str(run_dir), "optim.epochs=2"]) == 1
    stderr = capsys.readouterr().err
    assert "Unhandled error" not in stderr and "Traceback" not in stderr, stderr
    error = next(line for line in stderr.splitlines() if line.startswith("error: "))
    named = re.fullmatch(r"error: training stopped: peer (\d) step (\d+): loss term '\w+' is (nan|inf|-inf)(.*)", error)
    assert named, error
    assert named.group(1) == "1" or "the message from peer 1 is already non-finite" in named.group(4), error
    assert int(re.search(r"step (\d+)", error).group(1)) >= 8  # in epoch 2 (8 steps per epoch)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["epoch_001"]
    assert tree_digest(run_dir / "checkpoints" / "epoch_001") == before
    assert alive_actors() == []


def fake_cluster_config(*overrides: str):
    return synthetic_config(None, "cohort.backend=ray", *overrides)


def test_peers_get_one_gpu_each_when_the_cluster_has_gpus_else_a_cpu_share():
    from cohort.backends import check_resources

    gpu_node = {"CPU": 16.0, "GPU": 4.0}
    assert check_resources(fake_cluster_config(), gpu_node, [gpu_node]) == (1.0, 1.0)
    cpu_node = {"CPU": 2.0}
    assert check_resources(fake_cluster_config(), cpu_node, [cpu_node]) == (1.0, 0.0)
    shared = fake_cluster_config("cohort.gpus_per_peer=0.5", "cohort.size=4")
    assert check_resources(shared, {"CPU": 8.0, "GPU": 2.0}, [{"CPU": 8.0, "GPU": 2.0}]) == (1.0, 0.5)


def test_a_peer_too_big_for_every_single_node_is_refused():
    from cohort.backends import check_resources

    nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    with pytest.raises(ConfigError, match="no single Ray node has 3 CPUs"):
        check_resources(fake_cluster_config("cohort.cpus_per_peer=3"), {"CPU": 8.0}, nodes + nodes)


@pytest.mark.usefixtures("ray_session")
def test_driver_holds_a_bounded_number_of_objects_over_a_run(tmp_path):
    """The driver owns every publish/learn result; with at most max_steps_in_flight
    steps outstanding that number must not grow with the length of the run."""
    import ray

    config = synthetic_config(
        tmp_path, "cohort.backend=ray", "data.batch_size=4", "cohort.transport_dtype=bfloat16", "optim.epochs=1"
    )
    cohort = Cohort(config, prepare_run_dir(config, resume=False), log=quiet)
    owned: list[int] = []
    core_worker = ray._private.worker.global_worker.core_worker
    cohort.callbacks.append(OnStep(lambda step: owned.append(len(core_worker.get_all_reference_counts()))))
    result = cohort.fit()
    assert len(owned) == 16  # 64 images / batch 4
    in_flight = config.cohort.max_steps_in_flight
    assert max(owned) <= 2 * config.cohort.size * in_flight + 8, owned  # publish + learn refs, plus a few
    assert max(owned[-4:]) <= max(owned[:4]), owned
    assert all(0 <= top1 <= 1 for top1 in result.final_top1)  # bfloat16 transport trains end to end


@pytest.mark.usefixtures("ray_session")
def test_failures_beyond_max_failures_stop_the_run_and_point_to_resume(tmp_path):
    from cohort.coordinator import TrainingStopped

    config = synthetic_config(tmp_path, "cohort.backend=ray", "run.max_failures=0")
    cohort = Cohort(config, prepare_run_dir(config, resume=False), log=quiet)

    def kill_peer_zero(step: int) -> None:
        if step == 1:
            kill_peer(cohort, 0)

    cohort.callbacks.append(OnStep(kill_peer_zero))
    with pytest.raises(TrainingStopped, match=r"peer 0's actor died .*giving up after 0 recoveries .*--resume"):
        cohort.fit()
    assert alive_actors() == []
