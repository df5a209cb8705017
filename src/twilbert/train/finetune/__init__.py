"""Finetuning: a classification head on a pretrained encoder, or the TF-IDF baseline, fitted on one task.

- ``encoders``: what a classifier is finetuned on (a TWilBert directory, a local Hugging Face checkpoint);
- ``learners``: one model family, which prepares splits and fits a model monitored on a held-out split;
- ``learner_run``: a learner on a task, fitted once or once per fold (blended), scored on every split;
- ``degenerate``: runs whose score says little (one class predicted, too few examples);
- ``stage_work``: the finetune stage's work, from the task's files to the model directory and metrics files.
"""
