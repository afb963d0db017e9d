"""cohort: online mutual distillation of a cohort of peer networks.

    import cohort
    config = cohort.load_config("configs/amln_fashion.yaml", ["method.beta=2"])
    result = cohort.train(config)            # runs/<name>/ with metrics and checkpoints
    model = cohort.load_peer(result.best_peer_path)

Public entry points: ``Config``, ``load_config``, ``train``, ``load_peer``,
``read_peer_metadata``, ``create_model``, ``list_models``, ``list_methods``,
``list_pairings``. The command line is ``python -m cohort.run``.
"""

from .checkpoint import CheckpointError, load_peer, read_peer_metadata
from .config import Config, ConfigError, load_config
from .coordinator import RunResult, train
from .methods import list_methods
from .models import create_model, list_models
from .pairing import list_pairings

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "RunResult",
    "create_model",
    "list_methods",
    "list_models",
    "list_pairings",
    "load_config",
    "load_peer",
    "read_peer_metadata",
    "train",
]
