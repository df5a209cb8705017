"""What the pipeline reports: results tables, statistics over seeds, comparisons, plots, pretraining inspection."""
