"""A finetuned model as an MLflow pyfunc model ("from code", MLflow 3): this file is the model's code and
the model directory its one artifact, so loading reads safetensors and JSON, never a pickle. Predictions
run ``twilbert predict``'s path: input texts (a list, or a DataFrame with ``text`` and the model's
second-text column); output per text ``label`` (multi-label: ``|``-joined) and ``prob_<class>``, or
``value`` for regression. The twilbert package must be installed where the model is loaded."""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature, set_model
from mlflow.types import ColSpec, Schema

MODEL_DIR = "model_dir"  # the artifact's key
TEXT_COLUMN = "text"
# What the loaded model imports, pinned to the versions installed here. Given explicitly: MLflow's
# own inference would import-trace the model (slow) and may ask the package index (network).
BASE_REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "sentencepiece", "safetensors", "pyyaml")
EXTRA_REQUIREMENTS = {"hf": ("transformers", "tokenizers"), "baseline": ("scikit-learn", "scipy")}


@contextmanager
def quiet_mlflow() -> Iterator[None]:
    """No artifact progress bar and no advice about input examples in the stage's log: the signature
    is given explicitly, and an input example would run the model at every save."""
    added = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ
    if added:
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example.*", category=UserWarning)
            yield
    finally:
        if added:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """pyfunc front of :class:`twilbert.inference.classifier.Classifier`."""

    def load_context(self, context) -> None:
        from twilbert.inference.classifier import load_classifier

        self.clf = load_classifier(context.artifacts[MODEL_DIR])

    # pd.DataFrame: what MLflow hands over once the signature is enforced (a list of texts becomes one)
    def predict(self, context, model_input: pd.DataFrame, params: Optional[dict[str, Any]] = None) -> pd.DataFrame:
        texts, aux = input_texts(model_input, self.clf.aux_header)
        scores = self.clf.scores(texts, aux)
        decided = self.clf.model.decide(scores)
        if self.clf.problem_type == "regression":
            return pd.DataFrame({"value": decided})
        if self.clf.problem_type == "multi_label_classification":
            decided = ["|".join(labels) for labels in decided]
        probs = {f"prob_{label}": scores[:, i].astype("float64") for i, label in enumerate(self.clf.labels)}
        return pd.DataFrame({"label": decided, **probs})


def input_texts(model_input: Any, aux_header: Optional[str]) -> tuple[list[str], Optional[list[str]]]:
    """(texts, second texts or None) from a DataFrame (a ``text`` column, or its only column) or a list of texts."""
    if isinstance(model_input, str):
        model_input = [model_input]
    if not isinstance(model_input, pd.DataFrame):
        model_input = pd.DataFrame({TEXT_COLUMN: list(model_input)})
    columns = list(model_input.columns)
    if TEXT_COLUMN not in columns and aux_header is None and len(columns) == 1:
        columns = [TEXT_COLUMN]
        model_input = model_input.set_axis(columns, axis=1)
    missing = [c for c in (TEXT_COLUMN, aux_header) if c is not None and c not in columns]
    if missing:
        raise ValueError(f"the input has no {' or '.join(map(repr, missing))} column (columns: "
                         f"{', '.join(map(str, columns))}); give a DataFrame with {TEXT_COLUMN!r}"
                         + (f" and {aux_header!r} columns" if aux_header else " column, or a list of texts"))

    def column(name: str) -> list[str]:
        return model_input[name].fillna("").astype(str).tolist()

    return column(TEXT_COLUMN), None if aux_header is None else column(aux_header)


def signature(labels: list[str], problem_type: str, aux_header: Optional[str]) -> ModelSignature:
    """Input: the texts (a list, or a one-column DataFrame), or the ``text`` and second-text columns;
    output: ``label`` and ``prob_<class>`` columns, or ``value``."""
    # One unnamed column, so that MLflow accepts a plain list of texts as well as a DataFrame.
    inputs = [ColSpec("string", TEXT_COLUMN), ColSpec("string", aux_header)] if aux_header else [ColSpec("string")]
    if problem_type == "regression":
        outputs = [ColSpec("double", "value")]
    else:
        outputs = [ColSpec("string", "label")] + [ColSpec("double", f"prob_{label}") for label in labels]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def pip_requirements(backbone: str) -> list[str]:
    """The installed versions of what the model needs (read locally: no network)."""
    names = BASE_REQUIREMENTS + EXTRA_REQUIREMENTS.get(backbone, ())
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def save_classifier_model(model_dir: Union[str, Path], path: Union[str, Path],
                          description: Optional["mlflow.models.Model"] = None) -> Path:
    """Save the finetuned ``model_dir`` as an MLflow pyfunc model at ``path`` (a new directory).

    ``description``: the ``MLmodel`` to fill (a logged model's id and run); the file keeps no
    absolute path, so the saved model loads wherever its folder, or the store holding it, is moved."""
    from twilbert.inference.predict import load_finetuned

    fm = load_finetuned(model_dir)  # validates the directory and gives the signature's columns
    with quiet_mlflow():
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=__file__,
            artifacts={MODEL_DIR: str(model_dir)},
            signature=signature(fm.labels, fm.problem_type, fm.aux_header),
            pip_requirements=pip_requirements(fm.backbone),
            metadata={"twilbert.task": fm.task.name, "twilbert.problem_type": fm.problem_type},
            mlflow_model=description,
        )
    strip_absolute_paths(Path(path))
    return Path(path)


def strip_absolute_paths(path: Path) -> None:
    """MLflow writes into ``MLmodel`` the absolute paths the model was saved from (this machine's):
    the model code's (``model_code_path``) and each artifact's source (``uri``). Loading reads only
    the copies inside the model folder (``code/<file>``, the artifact's ``path``), so those are what
    is kept."""
    import yaml

    mlmodel = path / "MLmodel"
    data = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))
    flavor = data.get("flavors", {}).get("python_function", {})
    if flavor.get("model_code_path"):
        flavor["model_code_path"] = f"code/{Path(flavor['model_code_path']).name}"
    for artifact in (flavor.get("artifacts") or {}).values():
        if isinstance(artifact, dict) and "path" in artifact:
            artifact["uri"] = artifact["path"]
    mlmodel.write_text(yaml.safe_dump(data, default_flow_style=False, sort_keys=False), encoding="utf-8")


# Models from code: executed when MLflow loads the saved model, this names the model it serves.
set_model(ClassifierModel())
