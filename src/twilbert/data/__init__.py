"""Data: file formats, tweet preprocessing, tokenization, pair sampling, masking and task datasets."""
