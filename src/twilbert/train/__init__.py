"""Training math: optimizers and schedules, losses, metrics."""
