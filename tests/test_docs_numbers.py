"""Results quoted in README.md and docs/ are the committed results/: a quote that goes stale fails
here (`python scripts/docs_numbers.py --write` rewrites README's from results/results.md)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys

from helpers import REPO, apply_four_row_recipe, four_row_recipe_text
from twilbert.config import compose, load_config
from twilbert.reports.tables import comparison_table, pairs_table


def _script():
    spec = importlib.util.spec_from_file_location("docs_numbers_script", REPO / "scripts" / "docs_numbers.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script
    spec.loader.exec_module(script)
    return script


docs_numbers = _script()


def test_readme_quotes_the_committed_models_compared_table():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    results = (REPO / "results" / "results.md").read_text(encoding="utf-8")
    assert docs_numbers.readme_block(readme)[2] == docs_numbers.results_table(results), (
        "README's 'Run the default' table is not results/results.md's: python scripts/docs_numbers.py --write")


def test_the_compare_example_in_experiments_md_has_the_committed_baseline_row():
    assert docs_numbers.experiments_mismatches(REPO) == []


def test_a_stale_quote_is_found_and_rewritten(tmp_path):
    """The check can fail: a README quoting other numbers is caught, and --write makes it current."""
    for name in ("README.md", "results/results.md", "results/metrics.json", "results/pretrain.json",
                 "docs/experiments.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    docs_numbers.write_readme(tmp_path)  # current first, whatever the committed pair holds
    readme = tmp_path / "README.md"
    start, end, body = docs_numbers.readme_block(readme.read_text(encoding="utf-8"))
    stale = re.sub(r"\d\d\.\d\d", "36.21", body, count=1)
    text = readme.read_text(encoding="utf-8")
    readme.write_text(text[:start] + stale + text[end:], encoding="utf-8")
    assert any(line.startswith("README.md") for line in docs_numbers.mismatches(tmp_path))
    assert docs_numbers.write_readme(tmp_path)
    assert not any(line.startswith("README.md") for line in docs_numbers.mismatches(tmp_path))
    experiments = tmp_path / "docs" / "experiments.md"
    text = experiments.read_text(encoding="utf-8")
    line = next(line for line in text.splitlines() if line.startswith("| baseline "))
    experiments.write_text(text.replace(line, re.sub(r"\| \d+\.\d+ ", "| 36.21 ", line, count=1)), encoding="utf-8")
    assert any("reads 36.21" in m for m in docs_numbers.experiments_mismatches(tmp_path))


def test_the_four_row_recipe_composes_without_placeholders(tmp_path):
    """docs/continued-pretraining.md's yaml, as written, into conf/config.yaml: three tasks on one
    dataset and task, the copies shown with the first and finetuned on their checkpoints."""
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    apply_four_row_recipe(tmp_path / "conf")
    raw = compose([], tmp_path / "conf")
    assert list(raw["tasks"]) == ["tass_default", "tass_asis", "tass_scratch"]
    default = raw["tasks"]["tass_default"]
    for name, folder in (("tass_asis", "checkpoints/beto"), ("tass_scratch", "checkpoints/twilbert-scratch")):
        task = raw["tasks"][name]
        assert (task["dataset"], task["task"]) == (default["dataset"], default["task"])
        assert task["compare_as"] == "tass_default"
        assert task["finetuning"] == {"backbone": "hf", "hf_path": folder, "baseline_row": False}
    cfg = load_config(raw)  # the config checks pass: compare_as names a task
    assert cfg.tasks["tass_asis"].finetuning_config(cfg.finetuning).hf_path == "checkpoints/beto"
    assert "<" not in four_row_recipe_text()


def test_the_four_row_example_has_todays_table_header():
    doc = (REPO / "docs" / "continued-pretraining.md").read_text(encoding="utf-8")
    blocks = doc.split("naming its folder", 1)[1].split("```\n")
    assert blocks[1].splitlines()[:2] == comparison_table([]).splitlines()[:2]
    assert blocks[3].splitlines()[:2] == pairs_table([]).splitlines()[:2]

