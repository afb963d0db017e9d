"""cohort: online mutual distillation of a cohort of peer networks.

    import cohort
    config = cohort.load_config("configs/amln_fashion.yaml", ["method.beta=2"])
    result = cohort.train(config)            # runs/<name>/ with metrics and checkpoints
    model = cohort.load_peer(result.best_peer_path)

Public entry points: ``Config``, ``load_config``, ``train``, ``Callback`` (hooks into
a run), ``load_peer``, ``read_peer_metadata``, ``create_model``, ``list_models``,
``list_methods``, ``list_pairings``, ``list_datasets``. The command line is
``python -m cohort.run``; ``python -m cohort.report RUN_DIR`` summarises a run.
"""

from .callbacks import Callback
from .checkpoint import CheckpointError, load_peer, read_peer_metadata
from .config import Config, ConfigError, load_config
from .coordinator import RunResult, TrainingStopped, train
from .data import DATASETS
from .methods import list_methods
from .models import create_model, list_models
from .pairing import list_pairings

__version__ = "0.1.0"


def list_datasets() -> list[str]:
    """Names accepted by ``data.name``."""
    return DATASETS.names()


__all__ = [
    "Callback",
    "CheckpointError",
    "Config",
    "ConfigError",
    "RunResult",
    "TrainingStopped",
    "create_model",
    "list_datasets",
    "list_methods",
    "list_models",
    "list_pairings",
    "load_config",
    "load_peer",
    "read_peer_metadata",
    "train",
]
