"""Finetuned models at use: the public Classifier, batch prediction, embeddings, input readers, the MLflow pyfunc."""
