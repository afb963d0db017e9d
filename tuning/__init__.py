"""Ray Tune sweeps over cohorts: ``python -m tuning.sweep --config configs/sweeps/NAME.yaml``.

schema.py (the sweep file), space.py (Tune's search space), trial.py (one trial =
one cohort), sweep.py (the command), results.py and plots.py (what a sweep leaves).
"""
