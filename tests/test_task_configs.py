"""Every task definition in conf/task/ composes into a valid config and, where TWilBert's sample
files are at hand (../shared/data/twilbert-samples), reads them as they are."""

import os
from pathlib import Path

import pytest

from helpers import REPO, load_acceptance_script
from twilbert.config import compose, load_config
from twilbert.data.tasks import load_task
from twilbert.evaluation.metrics import official_metric_name

SAMPLE_TASKS = load_acceptance_script().SAMPLE_TASKS
SAMPLES = Path(os.environ.get("TWILBERT_SAMPLES", REPO.parent / "shared" / "data" / "twilbert-samples")) / "tasks"
TASK_NAMES = sorted(p.stem for p in (REPO / "conf" / "task").glob("*.yaml"))
EMOTIONS = ["anger", "anticipation", "disgust", "fear", "joy", "love", "optimism", "pessimism", "sadness",
            "surprise", "trust"]

# The official metric of each benchmark of TWilBert's results table.
OFFICIAL = {
    "coset17": "mf1", "irosva19_es": "mf1", "irosva19_mx": "mf1", "irosva19_cu": "mf1", "gender17": "acc",
    "stance17": "stance_f1", "haha18": "f1", "haha19": "f1", "tass19_es": "mf1", "tass19_mx": "mf1",
    "tass19_pe": "mf1", "tass19_cr": "mf1", "tass19_uy": "mf1", "tass20_es": "mf1", "tass18_4": "mf1",
    "hateeval19": "mf1", "mexa3t19": "f1", "multistance18": "stance_f1", "semeval18_affect": "jaccard",
}

needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"{SAMPLES} not present")


def task_config(name, data_dir=None):
    raw = compose([f"+task@tasks.{name}={name}"], REPO / "conf")
    if data_dir is not None:
        raw["tasks"][name]["dataset"]["data_dir"] = str(data_dir)
    return load_config(raw).tasks[name]


def test_every_benchmark_of_the_results_table_has_a_definition():
    assert set(OFFICIAL) | {"evomsa_tass"} == set(TASK_NAMES)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_composes_into_a_valid_config_with_its_official_metric(name):
    task = task_config(name)
    assert task.name == name
    if name != "evomsa_tass":
        assert official_metric_name(task.task) == OFFICIAL[name]
        assert task.dataset.data_dir == f"data/tasks/{name}"


def test_semeval_lists_the_eleven_emotions_in_e_c_order():
    spec = task_config("semeval18_affect").task
    assert spec.multi_label and list(spec.categories) == EMOTIONS
    assert list(spec.categories.values()) == list(range(11))


def test_humor_and_aggressiveness_are_scored_on_their_positive_class():
    for name in ("haha18", "haha19", "mexa3t19"):
        assert task_config(name).task.class_metric == "1"


def test_multistance_reads_the_next_tweet_as_its_second_input():
    ds = task_config("multistance18").dataset
    assert (ds.text_header, ds.aux_header) == ("TEXT", "NEXT")


@needs_samples
def test_every_sample_folder_has_a_task_definition():
    folders = {str(p.parent.relative_to(SAMPLES)) for p in SAMPLES.rglob("*") if p.is_file()}
    folders = {f.removesuffix("/train").removesuffix("/dev") for f in folders}
    assert folders == set(SAMPLE_TASKS.values())


def assert_read_as_labelled(task, data) -> None:
    """Every split holds examples, and every label is one of the task's categories."""
    assert len(data.train) and len(data.dev) and len(data.test)
    for split in (data.train, data.dev, data.test):
        if task.task.multi_label:
            assert all(len(y) == len(task.task.categories) for y in split.labels)
        else:
            assert set(split.labels) <= set(task.task.categories.values())


@needs_samples
@pytest.mark.parametrize("name", sorted(SAMPLE_TASKS))
def test_task_loads_its_sample_files_as_they_are(name):
    task = task_config(name, SAMPLES / SAMPLE_TASKS[name])
    data = load_task(task, seed=0)
    assert data.protocol == ("carve_dev" if name == "tass20_es" else "test_file") and not data.test_is_dev
    assert (data.train.aux_texts is not None) == (name == "multistance18")
    assert_read_as_labelled(task, data)


def assert_reads_like_the_spanish_task(variant: str, spanish: str, folder: Path) -> None:
    """A variant without samples of its own reads the Spanish samples exactly as the Spanish task does."""
    task, reference = task_config(variant, folder), task_config(spanish, folder)
    data, expected = load_task(task, seed=0), load_task(reference, seed=0)
    assert task.task.categories == reference.task.categories
    assert data.protocol == expected.protocol == "test_file" and not data.test_is_dev
    assert_read_as_labelled(task, data)
    for split in ("train", "dev", "test"):
        ours, theirs = getattr(data, split), getattr(expected, split)
        assert (ours.ids, ours.texts, ours.labels) == (theirs.ids, theirs.texts, theirs.labels)


@needs_samples
@pytest.mark.parametrize("variant", ["mx", "cu"])
def test_irosva_variants_read_the_spanish_sample_layout(variant):
    # No MX/CU samples ship with TWilBert; their definitions follow the ES layout.
    assert_reads_like_the_spanish_task(f"irosva19_{variant}", "irosva19_es", SAMPLES / "irosva19" / "subtask_a")


@needs_samples
@pytest.mark.parametrize("country", ["mx", "pe", "cr", "uy"])
def test_tass19_variants_read_the_spanish_sample_layout(country):
    assert_reads_like_the_spanish_task(f"tass19_{country}", "tass19_es", SAMPLES / "tass19" / "es")


def test_a_train_test_task_gets_a_stratified_dev_split(tmp_path):
    (tmp_path / "train.csv").write_text(
        "ID\tTEXT\tCLASS\n" + "".join(f"{i}\ttuit {i}\t{i % 2}\n" for i in range(40)), encoding="utf-8")
    (tmp_path / "test.csv").write_text("ID\tTEXT\tCLASS\n1\tuno\t0\n2\tdos\t1\n", encoding="utf-8")
    data = load_task(task_config("mexa3t19", tmp_path), seed=0)
    assert data.dev_from_train and not data.test_is_dev
    assert len(data.dev) == 6 and sorted(data.dev.labels) == [0, 0, 0, 1, 1, 1]
