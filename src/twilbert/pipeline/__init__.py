"""What runs the stages: shared stage set-up and errors, thread budget, the launcher lifeline, DVC experiments."""
