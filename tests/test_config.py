"""Config loading, overrides and the one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cohort.config import METHOD_CONFIGS, Config, ConfigError, load_config
from cohort.methods import METHODS, list_methods
from cohort.run import main

from helpers import REPO

SWEEPS = REPO / "configs" / "sweeps"
CONFIG_FILES = sorted(
    p for p in (REPO / "configs").rglob("*.yaml") if SWEEPS not in p.parents
)  # sweeps: tests/test_sweep.py


def test_defaults_are_the_embedded_run():
    config = Config()
    assert (config.data.name, config.cohort.size, config.cohort.pairing, config.method.name) == (
        "fashion_mnist",
        2,
        "cyclic",
        "amln",
    )
    assert config.cohort.backend == "ray" and config.data.download is False
    assert config.method.temperature == 3.0  # the paper's T


def test_required_keys_exist_with_their_names():
    config = load_config(
        None,
        [
            "data.name=synthetic",
            "data.root=/tmp/x",
            "data.batch_size=64",
            "data.train_subset=100",
            "data.test_subset=50",
            "data.download=false",
            "cohort.size=3",
            "cohort.models=resnet32",
            "cohort.pairing=all_pairs",
            "cohort.backend=local",
            "method.name=amln",
            "method.temperature=4",
            "method.beta=2",
            "optim.epochs=5",
            "optim.lr=0.05",
            "run.seed=7",
            "run.out_dir=/tmp/out",
        ],
    )
    assert config.cohort.model_names == ["resnet32"] * 3
    assert (config.method.beta, config.optim.lr, config.run.seed) == (2.0, 0.05, 7)


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("cohort:\n  size: 3\nmethod:\n  beta: 0.5\n")
    config = load_config(path, ["method.beta=2"])
    assert config.cohort.size == 3 and config.method.beta == 2.0


def test_method_section_without_name_means_amln():
    assert load_config(None, ["method.beta=3"]).method.name == "amln"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_file_loads(path):
    assert isinstance(load_config(path), Config)


def test_there_are_config_files():
    assert len(CONFIG_FILES) >= 5


def test_method_configs_come_from_the_method_registry():
    """Each method's config class lives in its method's file; the method section's
    union is built from the registry, so a registered method is configurable."""
    assert sorted(METHOD_CONFIGS) == list_methods()
    for name, config_class in METHOD_CONFIGS.items():
        assert METHODS.get(name).config_class is config_class
        assert config_class.__module__ == METHODS.get(name).__module__
        assert load_config(None, [f"method.name={name}"]).method.__class__ is config_class


BAD = [
    (["cohort.sise=3"], "cohort.sise", "did you mean 'size'"),
    (["data.bacth_size=3"], "data.bacth_size", "did you mean 'batch_size'"),
    (["cohort.size=1"], "cohort.size", "greater than or equal to 2"),
    (["method.beta=-1"], "method.beta", "greater than or equal to 0"),
    (["data.batch_size=many"], "data.batch_size", "valid integer"),
    (["cohort.models=resnet21"], "cohort.models", "did you mean"),
    (["cohort.models=[resnet20,resnet32,resnet56]"], "cohort.models", "cohort.size is 2"),
    (["cohort.models=[resnet20,resnet18]"], "cohort.models", "same number of blocks"),
    (["method.name=amnl"], "method.name", "did you mean 'amln'"),
    (["cohort.pairing=cyclc"], "cohort.pairing", "did you mean 'cyclic'"),
    (["cohort.backend=rya"], "cohort.backend", "valid: ray, local"),
    (["data.name=cifar"], "data.name", "did you mean 'cifar10'"),
    (["method.name=dml", "method.beta=2"], "method.beta", "valid keys in method 'dml'"),
    (["optim.milestones=[5,3]"], "optim.milestones", "strictly increasing"),
    (["nonsense"], "nonsense", "key=value"),
]


@pytest.mark.parametrize("overrides,key,hint", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_config_is_one_line_naming_the_key_exit_2(overrides, key, hint, tmp_path, capsys):
    out_dir = tmp_path / "never"
    code = main([*overrides, f"run.out_dir={out_dir}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err
    assert key in err and hint in err
    assert not out_dir.exists()  # nothing started, nothing written


def test_missing_config_file_names_it(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cohort:\n  size: [3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line"):
        load_config(bad)


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("old: run\n")
    assert main(["data.name=synthetic", f"run.out_dir={run}"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == "old: run\n"


def test_real_process_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cohort.run", "cohort.size=1", f"run.out_dir={tmp_path / 'x'}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: cohort.size: input should be greater than or equal to 2 (got 1)"]
    assert not Path(tmp_path / "x").exists()
