"""dvc.yaml and dvc.lock as a second researcher meets them: a fresh clone's lock is not stale, the
finetuning stages track every key that changes a run, and no stage output depends on history."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from twilbert.codebase import PACKAGE_DIR, import_closure, relative_paths
from twilbert.config import FinetuningConfig, compose
from twilbert.config.runs import expand_seeds, finetune_runs

BASELINE_KEYS = {"baseline_model", "baseline_c", "baseline_row"}


def stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def test_the_finetune_stages_track_every_finetuning_key_but_the_seed_count():
    params = stages()["finetune"]["do"]["params"]
    tracked = {p.split(".", 1)[1] for p in params if isinstance(p, str) and p.startswith("finetuning.")}
    fields = {f.name for f in dataclasses.fields(FinetuningConfig)}
    # seeds only says how many stages there are: tracking it would rerun every seed when one is added
    assert tracked == fields - {"seeds"} - BASELINE_KEYS
    baseline = {p.split(".", 1)[1] for p in stages()["baseline"]["do"]["params"] if p.startswith("finetuning.")}
    assert BASELINE_KEYS <= baseline and "seeds" not in baseline


def test_no_stage_output_is_persisted_so_every_stage_can_come_back_from_the_run_cache():
    # DVC's run cache skips a stage with a persisted output, and a training checkpoint folder's content
    # depends on the run's history: checkpoints live beside the outputs, not among them.
    for name, stage in stages().items():
        body = stage.get("do", stage)
        for out in [*body.get("outs", []), *body.get("metrics", [])]:
            if isinstance(out, dict):
                (path, opts), = out.items()
                assert not opts.get("persist"), f"{name}: {path} is persisted"
                assert "checkpoints" not in path, f"{name}: {path}"
            else:
                assert "checkpoints" not in out, f"{name}: {out}"


def test_a_count_of_seeds_and_a_list_make_the_runs_dvc_iterates():
    tasks = {"a": {"dataset": {"data_dir": "data/a"}}, "b": {"dataset": {"data_dir": "data/b"}}}
    assert expand_seeds(3) == [0, 1, 2] and expand_seeds([7, 0]) == [7, 0]
    runs = finetune_runs(tasks, 2)
    assert list(runs) == ["a-s0", "a-s1", "b-s0", "b-s1"]
    assert runs["b-s1"] == {"task": "b", "seed": 1, "data_dir": "data/b"}
    # adding a seed keeps every existing run as it was: only the new stage is new
    more = finetune_runs(tasks, 3)
    assert {k: more[k] for k in runs} == runs and set(more) - set(runs) == {"a-s2", "b-s2"}


def test_the_committed_params_hold_the_runs_the_composition_derives():
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    assert params["finetune_runs"] == finetune_runs(params["tasks"], params["finetuning"]["seeds"])


@pytest.mark.slow
def test_a_fresh_clone_lists_no_changed_code_dependency_and_no_changed_param(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    # Byte-compiled files beside the code, as running anything from the clone leaves them: ignored.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(clone / "src"), str(clone / "stages")],
                   check=True, timeout=120)
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=clone, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    changed = []
    for stage, entries in json.loads(proc.stdout or "{}").items():
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            for path, state in (entry.get("changed deps") or {}).items():
                if not path.startswith(("data/", "models/", "results/")) and state != "deleted":
                    changed.append(f"{stage}: {path} {state}")
            if entry.get("changed params"):
                changed.append(f"{stage}: params {entry['changed params']}")
    assert not changed, "the committed dvc.lock is stale in a fresh clone: " + "; ".join(changed)


def test_dvcs_own_hydra_composition_derives_the_runs_of_a_seed_count(tmp_path):
    # `dvc exp run -S finetuning.seeds=5` composes params.yaml in DVC's process, with the resolver that
    # .dvc/config's hydra.plugins_path (stages/) registers: run in a fresh interpreter, as DVC is.
    out = tmp_path / "params.yaml"
    code = ("import sys; from dvc.utils.hydra import compose_and_dump; "
            "compose_and_dump(sys.argv[1], sys.argv[2], None, 'config', sys.argv[3], ['finetuning.seeds=5'])")
    proc = subprocess.run([sys.executable, "-c", code, str(out), str(REPO / "conf"), str(REPO / "stages")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    params = yaml.safe_load(out.read_text(encoding="utf-8"))
    assert list(params["finetune_runs"]) == [f"tass_default-s{s}" for s in range(5)]
    plugins = re.search(r"plugins_path\s*=\s*(\S+)", (REPO / ".dvc" / "config").read_text()).group(1)
    assert (REPO / plugins / "hydra_plugins").is_dir()


def test_dvc_exp_run_refuses_an_invalid_seed_count_as_a_plain_error_and_keeps_params(tmp_path):
    # Real `dvc exp run -S` in a scratch repository with this conf/ and this Hydra plugin: DVC prints the
    # project's line as its own `ERROR:`, not "unexpected error" with a support link (exit 255 is DVC's
    # code for any error it reports).
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "conf", repo / "conf")
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True, timeout=60)  # noqa: E731
    git("init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True, timeout=120)
    (repo / ".dvc" / "config").write_text(
        f"[core]\n    analytics = false\n[hydra]\n    enabled = true\n    plugins_path = {REPO / 'stages'}\n")
    params = yaml.safe_dump(compose([], repo / "conf"), sort_keys=False)
    (repo / "params.yaml").write_text(params)
    (repo / "dvc.yaml").write_text("stages:\n  s:\n    cmd: echo ran > out.txt\n    params: [seed]\n    outs: [out.txt]\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-S", "finetuning.seeds=0"], cwd=repo,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 255, proc.stderr
    assert lines == ["ERROR: finetuning.seeds must be a count from 1 to 100 or a list of seeds, got 0"], proc.stderr
    assert (repo / "params.yaml").read_text() == params and not (repo / "out.txt").exists()


def _covered(deps: list, repo: Path) -> set[Path]:
    """The package source files a stage's deps name: files, and every source file under a folder."""
    files: set[Path] = set()
    for dep in deps:
        path = (repo / str(dep)).resolve()
        if path.is_dir():
            files |= {f for f in path.rglob("*.py") if "__pycache__" not in f.parts}
        elif path.suffix == ".py":
            files.add(path)
    return {f for f in files if f.is_relative_to(PACKAGE_DIR)}


@pytest.mark.parametrize("name", [n for n, s in stages().items() if re.search(r"stages/\w+\.py", s.get("do", s)["cmd"])])
def test_each_stage_depends_on_exactly_the_package_code_its_script_imports(name):
    # dvc.yaml's deps and the import statements are one list: a module the stage runs but DVC does not
    # track would let an edit go unseen (no rerun, and a resume from checkpoints of the old code); a
    # module it lists but never runs would rerun the stage for nothing. scripts/stage_deps.py prints them.
    body = stages()[name].get("do", stages()[name])
    script = re.search(r"stages/\w+\.py", body["cmd"]).group(0)
    assert script in body["deps"], f"{name}: dvc.yaml does not list its script {script}"
    imported = set(import_closure(REPO / script))
    listed = _covered(body["deps"], REPO)
    missing = sorted(relative_paths(imported - listed, REPO))
    unused = sorted(relative_paths(listed - imported, REPO))
    assert not missing, f"dvc.yaml stage {name}: deps miss {missing} (imported by {script}; see scripts/stage_deps.py)"
    assert not unused, f"dvc.yaml stage {name}: deps list {unused}, which {script} never imports"


def stage_deps_script():
    spec = importlib.util.spec_from_file_location("stage_deps_script", REPO / "scripts" / "stage_deps.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_the_tfidf_baseline_reruns_for_the_vocabulary_not_for_a_retrained_encoder():
    # it reads only the vocabulary's preprocessing: a pretraining change (`make exp` on model.*) must
    # leave it skipped, so neither pretrain nor anything after it is upstream of it
    script = stage_deps_script()
    assert script.upstream(stages(), "baseline") == {"data", "vocab"}
    assert "--vocab data/vocab" in stages()["baseline"]["do"]["cmd"]


def test_every_stage_depends_only_on_outputs_its_command_passes_to_its_script():
    assert stage_deps_script().unread_data_deps(stages()) == []


def test_a_data_dep_that_the_command_does_not_pass_is_reported():
    pipeline = {
        "pretrain": {"cmd": "sh stages/py stages/pretrain.py --out models/pretrained", "outs": ["models/pretrained"]},
        "vocab": {"cmd": "sh stages/py stages/vocab.py --out data/vocab", "outs": ["data/vocab"]},
        "baseline": {"foreach": "${tasks}", "do": {
            "cmd": "sh stages/py stages/baseline.py --task ${key} --vocab data/vocab",
            "deps": ["stages/baseline.py", "models/pretrained", "data/vocab", "${item.dataset.data_dir}"]}},
    }
    assert stage_deps_script().unread_data_deps(pipeline) == [
        "dvc.yaml stage baseline: depends on models/pretrained (written by pretrain), which its command does not "
        "pass to stages/baseline.py"]


def test_the_import_closure_follows_function_level_and_relative_imports(tmp_path):
    # a module imported only inside a function runs when the function does: it is part of the closure
    script = tmp_path / "stage.py"
    script.write_text("def main():\n    from twilbert.data import special\n", encoding="utf-8")
    closure = relative_paths(import_closure(script), PACKAGE_DIR.parent.parent)
    assert closure == ["src/twilbert/__init__.py", "src/twilbert/data/__init__.py", "src/twilbert/data/special.py"]


def test_a_training_runs_code_fingerprint_covers_config_and_numerics():
    # config derives model shapes and numerics pins the kernels: an edit to either is another run
    for entry in ("twilbert.train.pretrain", "twilbert.train.finetune.stage_work"):
        closure = relative_paths(import_closure(entry), PACKAGE_DIR)
        assert "config/model.py" in closure and "data/special.py" in closure, entry
