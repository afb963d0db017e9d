"""A sweep file's ``space`` as Ray Tune's search space (flat, dotted keys)."""

from __future__ import annotations

from typing import Any

from ray import tune

from .schema import Distribution, SweepConfig

SAMPLERS = {
    "grid": lambda values: tune.grid_search(list(values)),
    "choice": lambda values: tune.choice(list(values)),
    "uniform": lambda bounds: tune.uniform(*bounds),
    "loguniform": lambda bounds: tune.loguniform(*bounds),
    "randint": lambda bounds: tune.randint(*bounds),
}


def search_domain(distribution: Distribution) -> Any:
    return SAMPLERS[distribution.kind](distribution.values)


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """``{"method.beta": tune.grid_search([...]), ...}``: Tune samples each trial's
    dotted keys; ``tuning.schema.trial_config`` applies them to the base experiment."""
    return {key: search_domain(distribution) for key, distribution in sweep.space.items()}
