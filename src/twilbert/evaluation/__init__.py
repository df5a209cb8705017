"""Scores of a classifier: the tasks' metrics, the scores and decisions on packed rows, per-example prediction files.

Below training (its dev monitor) and above the model; imports config, data and model only."""
