"""On a CUDA machine: peers train on the GPU, in bf16 autocast, with messages
still crossing as CPU arrays. Skipped (with the reason) where there is no GPU."""

from __future__ import annotations

import math

import pytest

from helpers import synthetic_config

pytestmark = pytest.mark.gpu


def test_peer_trains_on_the_gpu_in_bf16_and_publishes_cpu_messages():
    from cohort.peer import Peer

    config = synthetic_config(None, "run.device=cuda", "run.precision=bf16", "method.name=amln")
    learner, teacher = Peer(0, config), Peer(1, config)
    assert learner.describe()["device"].startswith("cuda")
    message = teacher.publish(0)
    assert all(not hasattr(t, "device") for t in (message.logits, *message.blocks))  # numpy, i.e. host memory
    learner.publish(0)
    terms = learner.learn(0, message)
    assert all(math.isfinite(v) for v in terms.values())
    assert next(learner.model.parameters()).is_cuda


@pytest.mark.ray
@pytest.mark.usefixtures("ray_session")
def test_a_cohort_shares_one_gpu_and_the_driver_reads_its_checkpoint_on_cpu(tmp_path):
    """Two peers on half a GPU each; everything they return to the driver (state,
    evaluation) is on CPU, so a CPU-only head node can read the checkpoint."""
    import ray

    from cohort.checkpoint import latest_checkpoint, load_checkpoint, load_peer
    from cohort.coordinator import train

    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the shared Ray instance was started without a GPU")
    from cohort.callbacks import Callback

    returned = []

    class KeepWhatPeersReturn(Callback):
        def on_start(self, cohort, first_epoch):
            self.cohort = cohort

        def on_epoch(self, epoch, metrics):
            backend = self.cohort.backend
            returned.extend(backend.get([backend.call(j, "state") for j in range(2)]))
            returned.extend(backend.get([backend.call(j, "evaluate", "test") for j in range(2)]))

    config = synthetic_config(tmp_path, "cohort.backend=ray", "cohort.gpus_per_peer=0.5", "method.name=amln")
    result = train(config, callbacks=[KeepWhatPeersReturn()], log=lambda line: None)
    devices = {t.device.type for t in tensors_in(returned)}
    assert devices == {"cpu"}, devices  # the driver never receives a CUDA tensor
    states, _ = load_checkpoint(latest_checkpoint(result.run_dir))
    assert states[0]["optimizer"]["state"]
    model = load_peer(result.best_peer_path, device="cpu")
    assert next(model.parameters()).device.type == "cpu"


def tensors_in(tree):
    import torch

    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from tensors_in(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from tensors_in(value)
