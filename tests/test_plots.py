"""The curves for people: finetuning curves as DVC plot files, PNGs of every curve (same bytes for
the same curves), and the one log line per epoch with its ETA."""

from __future__ import annotations

import csv

from twilbert.progress import EpochClock, format_duration
from twilbert.reports.plots import write_finetune_curves, write_pngs
from twilbert.train.curves import CurveRecorder


def write_rows(path, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def pretrain_curves(directory):
    rec = CurveRecorder(prefix="pretrain")
    for epoch in (1, 2):
        for step in (10, 20):
            rec.log_metrics({"pretrain_loss": 6.0 - epoch - step / 100, "pretrain_lr": 0.001,
                             "pretrain_running_mlm_accuracy": 0.1, "pretrain_running_rop_accuracy": 0.5},
                            step=step * epoch)
        rec.add_epoch(epoch, 20 * epoch, {"train_loss": 6.0 - epoch, "train_mlm_loss": 5.0 - epoch,
                                          "heldout_mlm_loss": 5.5 - epoch, "train_mlm_accuracy": 0.1 * epoch,
                                          "heldout_mlm_accuracy": 0.1, "train_rop_accuracy": 0.5,
                                          "heldout_rop_accuracy": 0.55, "epoch": epoch})
    rec.write(directory)
    return rec


def test_recorded_points_survive_a_checkpoint_round_trip_and_are_written_in_order(tmp_path):
    rec = pretrain_curves(tmp_path / "a")
    copy = CurveRecorder(prefix="pretrain")
    copy.restore(rec.state())
    copy.write(tmp_path / "b")
    for name in ("epochs.csv", "steps.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    header = (tmp_path / "a" / "steps.csv").read_text().splitlines()[0]
    assert header == "step,epoch,loss,lr,running_mlm_accuracy,running_rop_accuracy"


def test_finetune_curves_and_pngs_are_written_and_identical_on_a_rerun(tmp_path):
    epochs = tmp_path / "tass_default_epochs.csv"
    write_rows(epochs, [{"epoch": e, "train_loss": 1.2 / e, "dev_official": 0.3 + e / 20, "dev_acc": 0.5}
                        for e in (1, 2, 3)])
    pretrain_curves(tmp_path / "pretrain")
    shots = []
    for run in ("one", "two"):
        curves = write_finetune_curves({"tass_default": epochs}, tmp_path / run / "curves")
        pngs = write_pngs(tmp_path / run / "plots", tmp_path / "pretrain", curves)
        shots.append({p.name: p.read_bytes() for p in pngs})
    assert sorted(shots[0]) == ["finetune_tass_default.png", "pretrain_epochs.png", "pretrain_steps.png"]
    assert all(data.startswith(b"\x89PNG") for data in shots[0].values())
    assert shots[0] == shots[1]
    rows = (tmp_path / "one" / "curves" / "train_loss" / "tass_default.csv").read_text().splitlines()
    assert rows[0] == "epoch,train_loss" and len(rows) == 4
    rows = (tmp_path / "one" / "curves" / "dev_official" / "tass_default.csv").read_text().splitlines()
    assert rows[0] == "epoch,dev_official" and len(rows) == 4


def test_a_k_fold_task_plots_its_first_fold(tmp_path):
    epochs = tmp_path / "epochs.csv"
    write_rows(epochs, [{"fold": f, "epoch": e, "train_loss": 1.0, "dev_official": 0.5} for f in (0, 1) for e in (1, 2)])
    curves = write_finetune_curves({"t": epochs}, tmp_path / "curves")
    assert [r["epoch"] for r in curves["t"]] == [1, 2]


def test_the_epoch_line_has_epoch_of_total_metrics_elapsed_and_eta():
    now = [100.0]
    clock = EpochClock(total_epochs=10, first_epoch=0, clock=lambda: now[0])
    now[0] += 30.0
    line = clock.line("pretrain", 3, {"train_loss": 5.25, "heldout_mlm_accuracy": 0.1234, "epoch": 3})
    assert line == "pretrain epoch 3/10: train_loss 5.25 ho_mlm_acc 0.1234 | 30s elapsed, ETA 1m10s"
    assert format_duration(3725) == "1h02m" and format_duration(float("nan")) == "?"


def test_a_tasks_png_draws_every_seed_and_stars_each_runs_selected_epoch(tmp_path):
    paths = {}
    for seed in (0, 1):
        paths[f"t-s{seed}"] = tmp_path / f"s{seed}.csv"
        write_rows(paths[f"t-s{seed}"], [{"epoch": e, "train_loss": 1.0 / e, "dev_official": 0.1 * e + seed / 10}
                                         for e in (1, 2, 3)])
    curves = write_finetune_curves(paths, tmp_path / "curves")
    plain = write_pngs(tmp_path / "plain", None, curves)
    starred = write_pngs(tmp_path / "starred", None, curves, {"t-s0": 2, "t-s1": 3})
    assert [p.name for p in plain] == [p.name for p in starred] == ["finetune_t.png"]  # one figure, both seeds
    assert plain[0].read_bytes() != starred[0].read_bytes()
    # the star is where the run's dev curve is at its selected epoch: an epoch it never reached draws none
    assert write_pngs(tmp_path / "far", None, curves, {"t-s0": 9, "t-s1": 9})[0].read_bytes() == plain[0].read_bytes()
