"""MLflow tracking: the store, the parent and child runs of each stage, the UI's shared view."""
