"""`ray job submit -- python -m cohort.run ...` against a real local head, exactly as
the README's cluster section tells a user to do it."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from contextlib import suppress
from pathlib import Path

import polars as pl
import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RAY = str(Path(sys.executable).with_name("ray"))
REPO = Path(__file__).resolve().parents[1]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_head():
    """A separate Ray head (its own ports, temp dir and auth token, so the test
    session's Ray and the user's ~/.ray are untouched) with token authentication on,
    as the README sets it up; yields (dashboard address, the environment a client
    needs). Stopped by signalling its process group rather than `ray stop`, which
    would stop every Ray instance on the machine."""
    gcs, dashboard, agent, client = free_ports(4)
    temp_dir = tempfile.mkdtemp(prefix="cohort-head-", dir="/tmp")  # short: Ray's socket paths have a length limit
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes to ~/.ray/auth_token
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env = os.environ | auth | {"RAY_DISABLE_USAGE_STATS": "1", "COHORT_PROGRESS": "0"}
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
         "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    seen = []
    for line in head.stdout:  # ready when it says so (or it exited: the loop ends)
        seen.append(line)
        if "Ray runtime started" in line:
            break
    assert head.poll() is None, "ray start --head failed:\n" + "".join(seen)
    threading.Thread(target=seen.extend, args=(head.stdout,), daemon=True).start()  # keep the pipe drained
    try:
        yield f"http://127.0.0.1:{dashboard}", auth
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            head.wait(timeout=5)
        with suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # Ray's processes can linger after SIGTERM
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submitted_to_a_local_head_trains_and_writes_its_outputs(ray_head, tmp_path):
    address, auth = ray_head
    out_dir = tmp_path / "job-run"
    command = [
        RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
        "python", "-m", "cohort.run", "--config", "configs/amln_fashion.yaml",
        "data.name=synthetic", "data.train_subset=null",
        "data.synthetic.train_size=64", "data.synthetic.test_size=32", "data.batch_size=16",
        "optim.epochs=1", "optim.milestones=[]", f"run.out_dir={out_dir}",
    ]  # fmt: skip
    env = os.environ | auth  # RAY_AUTH_MODE=token, as the README tells users to set, and the head's token
    assert auth["RAY_AUTH_MODE"] == "token"
    env.pop("RAY_ADDRESS", None)
    job = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    log = job.stdout + job.stderr
    assert job.returncode == 0, log
    assert "succeeded" in log and "Connecting to existing Ray cluster" in log, log
    assert "[cohort] done:" in log
    for name in ("config.yaml", "metrics.parquet", "best_peer.safetensors", "checkpoints/epoch_001/meta.json"):
        assert (out_dir / name).is_file(), name
    assert set(pl.read_parquet(out_dir / "metrics.parquet")["peer"].drop_nulls()) == {0, 1}


def test_a_sweep_submitted_as_a_job_runs_its_trials_on_the_cluster(ray_head, tmp_path):
    address, auth = ray_head
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "name": "job-sweep",
                "base": {
                    "data": {"name": "synthetic", "train_subset": None, "batch_size": 16},
                    "method": {"name": "dml"},
                    "optim": {"epochs": 1, "milestones": []},
                },
                "fixed": {"cohort.cpus_per_peer": 0.5},
                "space": {"method.temperature": {"grid": [2.0, 4.0]}},
                "out_dir": str(tmp_path / "sweep"),
            }
        )
    )
    command = [
        RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
        "python", "-m", "tuning.sweep", "--config", str(sweep_file),
    ]  # fmt: skip
    env = os.environ | auth
    env.pop("RAY_ADDRESS", None)
    job = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400)
    log = job.stdout + job.stderr
    assert job.returncode == 0, log
    assert "succeeded" in log and "Connecting to existing Ray cluster" in log, log
    results = pl.read_parquet(tmp_path / "sweep" / "results.parquet")
    assert sorted(results["method.temperature"].to_list()) == [2.0, 4.0]
    assert results["status"].to_list() == ["done", "done"]
    assert (tmp_path / "sweep" / "best_peer.safetensors").is_file()
