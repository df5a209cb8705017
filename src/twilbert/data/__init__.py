"""Data: file formats, tweet preprocessing, tokenization, pair sampling, batching, masking and task datasets."""
