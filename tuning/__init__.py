"""Ray Tune sweeps over cohort runs (cohort size, beta, ...). Built in a later issue."""
