"""The runtime of a training run: processes (distributed), checkpoints, the run directory, the metrics log and
progress, learning-rate schedules and parameter groups."""
