"""Time budgets: parsing, the epoch plan (fake clock), re-planning, the hour warning, and their use in train_kfold."""
import json
import logging
import math
import os
import warnings

import pytest

import artlearn as al
from conftest import quiet_train_kfold
import artlearn.kfold as kfold_module
from artlearn.budget import BatchTimer, FoldPlanner, FoldShape, Speed, measure_speed, parse_budget, plan_epochs


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def _speed(batch_s=0.5, view_s=0.01, setup_s=2.0, bs=32, size=64):
    return Speed(train_batch_s={size: batch_s}, eval_view_s=view_s, setup_s=setup_s, bs=bs)


SHAPE = FoldShape(n_train=3200, n_valid=800, size=64, views=2)  # 100 batches + 800 views: 58 s per epoch


@pytest.mark.parametrize("text, seconds", [("60min", 3600), ("1.5h", 5400), ("90s", 90), ("2 hours", 7200),
                                           (" 15 MIN ", 900), (120, 120.0), (0.5, 0.5)])
def test_parse_budget(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("bad", ["60", "ten min", "5 fortnights", "-5min", "0s", 0, -1, float("inf"), True, [60]])
def test_parse_budget_refuses_what_it_cannot_read(bad):
    with pytest.raises(ValueError, match="budget="):
        parse_budget(bad)


def test_parse_budget_none_is_no_budget():
    assert parse_budget(None) is None


def test_epoch_seconds_and_fixed_seconds():
    speed = _speed()
    assert SHAPE.mean_epoch_s(speed) == pytest.approx(100 * 0.5 + 800 * 0.01)
    assert SHAPE.fixed_s(speed) == pytest.approx(2.0 + 800 * 2 * 0.01)
    progressive = FoldShape(3200, 800, 64, small_size=32, small_fraction=0.25, views=2)
    speed2 = Speed(train_batch_s={32: 0.1, 64: 0.5}, eval_view_s=0.01, setup_s=2.0, bs=32)
    assert progressive.mean_epoch_s(speed2) == pytest.approx(0.25 * (10 + 8) + 0.75 * (50 + 8))


def test_plan_epochs_is_the_most_that_fit():
    left, folds, epoch_s, fixed_s, final_s = 3600.0, 4, 58.0, 18.0, 100.0
    epochs = plan_epochs(left, folds, epoch_s, fixed_s, final_s)
    used = lambda e: final_s + folds * (fixed_s + e * epoch_s)  # noqa: E731
    assert used(epochs) <= left < used(epochs + 1)


def test_plan_epochs_refuses_a_budget_too_small_with_what_it_needs():
    with pytest.raises(ValueError, match=r"leaves 60 s for 4 fold\(s\), but 1 epoch\(s\) per fold need about 4.5 min"):
        plan_epochs(60.0, 4, 58.0, 10.0, 0.0)


def test_planner_without_budget_keeps_the_recipe_epochs_and_estimates():
    planner = FoldPlanner(SHAPE, _speed(), [0, 1, 2, 3], epochs=10)
    assert planner.before_fold(0, [0, 1, 2, 3]) == 10
    text = planner.plan_text([0, 1, 2, 3])
    total = 4 * (SHAPE.fixed_s(_speed()) + 10 * SHAPE.mean_epoch_s(_speed()))
    assert text == f"4 folds x 10 epochs at 64 px, about {total / 60:.1f} min on this machine (1 process x 1 thread)"
    assert planner.hour_warning([0, 1, 2, 3]) is None


def test_hour_warning_names_the_time_and_what_to_try():
    planner = FoldPlanner(SHAPE, _speed(batch_s=20.0), [0], epochs=30)  # 2,008 s per epoch
    warning = planner.hour_warning([0])
    assert warning.startswith("one fold will take about 16.7 h on this machine")
    assert "--preset fast" in warning and "--budget 60min" in warning


def test_plan_fits_the_budget_and_replans_after_a_slow_fold():
    clock = FakeClock()
    budget = 3600.0
    planner = FoldPlanner(SHAPE, _speed(), [0, 1, 2, 3], budget_s=budget, start=clock.now, clock=clock,
                          predict_after=1000, n_models=4)
    final = planner.final_s
    assert final == pytest.approx(1000 * 2 * 4 * 0.01)
    e0 = planner.before_fold(0, [0, 1, 2, 3])
    assert 4 * planner.fold_seconds(e0) + final <= budget
    assert 4 * planner.fold_seconds(e0 + 1) + final > budget * 0.96
    clock.now += planner.fold_seconds(e0) * 1.5  # fold 0 took half as long again as planned
    planner.after_fold(0, planner.fold_seconds(e0) * 1.5)
    e1 = planner.before_fold(1, [1, 2, 3])
    assert e1 < e0
    spent = clock.now - planner.start
    assert spent + 3 * planner.fold_seconds(e1) + final <= budget
    record = planner.record()
    assert record["budget_seconds"] == budget
    assert record["folds"]["0"]["epochs"] == e0 and record["folds"]["0"]["actual_s"] > record["folds"]["0"]["planned_s"]
    assert record["folds"]["1"]["actual_s"] is None


def test_fast_fold_gives_the_next_folds_more_epochs():
    clock = FakeClock()
    planner = FoldPlanner(SHAPE, _speed(), [0, 1], budget_s=1800.0, start=clock.now, clock=clock)
    e0 = planner.before_fold(0, [0, 1])
    clock.now += planner.fold_seconds(e0) * 0.5
    planner.after_fold(0, planner.fold_seconds(e0) * 0.5)
    assert planner.before_fold(1, [1]) > e0


def test_measured_prediction_speed_replaces_the_estimate():
    planner = FoldPlanner(SHAPE, _speed(), [0, 1], budget_s=3600.0, clock=FakeClock(), start=1000.0,
                          predict_after=500, n_models=2)
    assert planner.final_s == pytest.approx(500 * 2 * 2 * 0.01)
    e0 = planner.before_fold(0, [0, 1])
    planner.after_fold(0, planner.fold_seconds(e0), predict_s=800 * 2 * 0.05)  # OOF: 0.05 s per view
    assert planner.predict_view_s == pytest.approx(0.05)
    assert planner.final_s == pytest.approx(500 * 2 * 2 * 0.05)


def test_overrun_after_a_trained_fold_warns_and_trains_the_least(caplog):
    clock = FakeClock()
    planner = FoldPlanner(SHAPE, _speed(), [0, 1], budget_s=1200.0, start=clock.now, clock=clock)
    e0 = planner.before_fold(0, [0, 1])
    clock.now += 1190.0  # fold 0 ate nearly the whole budget
    planner.after_fold(0, 1190.0)
    with caplog.at_level(logging.WARNING, logger="artlearn"):
        assert planner.before_fold(1, [1]) == 1
    assert e0 > 1
    assert "past the budget" in caplog.text


def test_budget_too_small_before_any_fold_is_a_value_error():
    planner = FoldPlanner(SHAPE, _speed(), [0, 1], budget_s=30.0, clock=FakeClock(), start=1000.0)
    with pytest.raises(ValueError, match="give a larger --budget"):
        planner.plan_text([0, 1])


def test_warmup_epochs_are_the_least_a_plan_trains():
    shape = FoldShape(3200, 800, 64, views=2, warmup=3)
    with pytest.raises(ValueError, match=r"4 epoch\(s\) per fold"):
        FoldPlanner(shape, _speed(), [0], budget_s=200.0, clock=FakeClock(), start=1000.0).before_fold(0, [0])


# ---------------------------------------------------------------- measuring, and train_kfold


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = al.make_synthetic_artworks(tmp_path_factory.mktemp("bud") / "data", n_artists=4, n_train=40, n_test=8,
                                      seed=3)
    return al.read_artworks(root / "train.csv", kind="train")


def test_batch_timer_stops_after_n_training_batches(table):
    dls = al.artist_dls(table, fold=0, size=16, bs=4, n_folds=2)
    learn = al.artist_learner(dls, arch="resnet18", progress=False, seed=0)
    steps = []
    learn.add_cb(type("Count", (__import__("fastai.callback.core", fromlist=["Callback"]).Callback,),
                      {"after_step": lambda self: steps.append(1)})())
    timer = BatchTimer(3)
    learn.fit(1, cbs=[timer])
    assert len(steps) == 3 and len(timer.stamps) == 4
    assert all(b > a for a, b in zip(timer.stamps, timer.stamps[1:]))


def test_measure_speed_on_a_real_learner(table):
    def build(size):
        dls = al.artist_dls(table, fold=0, size=size, bs=4, n_folds=2)
        return dls, al.artist_learner(dls, arch="resnet18", progress=False, seed=0)
    speed = measure_speed(build, [16, 24], bs=4)
    assert set(speed.train_batch_s) == {16, 24}
    assert all(0 < s < 30 for s in speed.train_batch_s.values())
    assert 0 < speed.eval_view_s < 5 and speed.setup_s > 0 and speed.threads >= 1


TINY = dict(n_folds=2, arch="resnet18", size=32, bs=8, progress=False)


def _fixed_speed(monkeypatch, batch_s):
    """measure_speed replaced by a fixed Speed and no re-plan from the folds' real times (a plan of a few epochs
    whatever this machine's load; re-planning is tested above with a fake clock)."""
    def fake(build, sizes, bs):
        return Speed(train_batch_s={s: batch_s for s in sizes}, eval_view_s=0.001, setup_s=0.1, bs=bs)
    monkeypatch.setattr(kfold_module, "measure_speed", fake)
    monkeypatch.setattr(FoldPlanner, "after_fold", lambda self, *args, **kw: None)


def _train(df, out, **kw):
    """train_kfold on TINY settings, quietly, collecting its log lines."""
    return quiet_train_kfold(df, out, TINY, **kw)


def test_train_kfold_logs_the_plan_before_fold_0_and_records_timing(table, tmp_path):
    run, lines = _train(table, tmp_path / "r", epochs=2)
    plan = [i for i, line in enumerate(lines) if line.startswith("plan: 2 folds x 2 epochs at 32 px, about ")]
    first_fold = next(i for i, line in enumerate(lines) if line.startswith("fold 0 (1 of 2 to train): 2 epochs"))
    assert plan and plan[0] < first_fold
    timing = json.loads((tmp_path / "r" / "summary.json").read_text())["timing"]
    assert timing["budget_seconds"] is None and timing["cpu_count"] >= 1 and timing["processes"] == 1
    assert [timing["folds"][k]["epochs"] for k in ("0", "1")] == [2, 2]
    assert all(timing["folds"][k]["actual_s"] > 0 for k in ("0", "1"))
    assert timing["train_seconds"] >= sum(timing["folds"][k]["actual_s"] for k in ("0", "1"))


def test_train_kfold_with_a_budget_trains_the_planned_epochs(table, tmp_path, monkeypatch):
    _fixed_speed(monkeypatch, batch_s=2.0)
    run, lines = _train(table, tmp_path / "r", budget="40s", procs=1)
    timing = run.summary["timing"]
    epochs = [timing["folds"][k]["epochs"] for k in ("0", "1")]
    assert all(e >= 1 for e in epochs)
    for k, e in zip((0, 1), epochs):
        assert len(run.histories[k]) == e  # the fold trained exactly what the plan said
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["budget"] == 40.0 and config["epochs"] is None
    assert any("(budget 40 s)" in line for line in lines)


def test_budget_too_small_is_refused_before_any_fold_trains(table, tmp_path, monkeypatch):
    _fixed_speed(monkeypatch, batch_s=60.0)
    with pytest.raises(ValueError, match="give a larger --budget"):
        _train(table, tmp_path / "r", budget="1min", procs=1)
    assert not (tmp_path / "r" / "fold0" / "best.safetensors").exists()


def test_slow_fold_warns_about_the_hour(table, tmp_path, monkeypatch):
    _fixed_speed(monkeypatch, batch_s=400.0)
    monkeypatch.setattr(kfold_module, "_fit_fold", lambda learn, epochs, fold: learn.fit(1))
    _, lines = _train(table, tmp_path / "r", epochs=3)
    assert any(line.startswith("one fold will take about") and "--preset fast" in line for line in lines)


def test_budgeted_run_resumes_with_another_budget(table, tmp_path, monkeypatch):
    _fixed_speed(monkeypatch, batch_s=2.0)
    _train(table, tmp_path / "r", budget="30s", procs=1, folds=[0])
    run, lines = _train(table, tmp_path / "r", budget="40s", procs=1)
    assert any("fold 0: complete checkpoint found" in line for line in lines)
    assert set(run.summary["timing"]["folds"]) == {"0", "1"}  # fold 0's record kept from the first call


@pytest.mark.parametrize("kw, match", [(dict(budget="soon"), "budget="), (dict(procs=0), "procs="),
                                       (dict(predict_after=-1), "predict_after=")])
def test_bad_budget_arguments(table, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _train(table, tmp_path / "r", **kw)
    assert not (tmp_path / "r").exists()


def test_procs_with_callbacks_is_refused(table, tmp_path):
    with pytest.raises(ValueError, match="cannot travel to other processes"):
        al.train_kfold(table, tmp_path / "r", procs=2, log=print, **TINY)


def test_fold_parallel_processes_train_every_fold(table, tmp_path, capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = al.train_kfold(table, tmp_path / "r", procs=2, epochs=1, **TINY)
    assert "torch.jit.script" not in capfd.readouterr().err  # the spawned processes start quiet too
    assert os.environ.get("PYTHONWARNINGS") is None or "torch.jit" not in os.environ["PYTHONWARNINGS"]
    assert run.folds == [0, 1]
    timing = run.summary["timing"]
    assert timing["processes"] == 2 and timing["threads_per_process"] >= 1
    assert set(timing["folds"]) == {"0", "1"}
    assert math.isfinite(run.oof_scores["accuracy"])


def test_fold_deadline_shortens_the_fit_and_reaims_the_cosine(table, tmp_path):
    from fastai.callback.core import Callback

    from artlearn.budget import FoldDeadline
    clock = FakeClock(0.0)

    class TenSecondEpochs(Callback):
        def after_train(self):
            clock.now += 10.0

    dls = al.artist_dls(table, fold=0, size=16, bs=8, n_folds=2)
    learn = al.artist_learner(dls, arch="resnet18", progress=False, seed=0, epochs=6, lr=1e-3, out=tmp_path, fold=0)
    learn.fit(6, cbs=[TenSecondEpochs(), FoldDeadline(deadline=25.0, clock=clock)])
    assert len(learn.history.rows) == 2  # after epoch 1 (10 s each) only one more fits before 25 s
    assert learn.cosine_annealing.t_total == 2
    lrs = learn.history.frame()["lr"].tolist()
    assert lrs[0] == pytest.approx(1e-3) and lrs[1] == pytest.approx(1e-3 * (1 + math.cos(math.pi / 2)) / 2)
    meta = json.loads((tmp_path / "fold0" / "meta.json").read_text())
    assert meta["complete"] is True and meta["epochs_run"] == 2


def test_fold_deadline_on_time_changes_nothing(table):
    from artlearn.budget import FoldDeadline
    dls = al.artist_dls(table, fold=0, size=16, bs=8, n_folds=2)
    learn = al.artist_learner(dls, arch="resnet18", progress=False, seed=0, epochs=2)
    learn.fit(2, cbs=[FoldDeadline(deadline=float("inf"))])
    assert len(learn.history.rows) == 2 and learn.cosine_annealing.t_total == 2


# ---------------------------------------------------------------- the size a budget affords


def test_choose_size_is_the_largest_that_keeps_the_target_epochs():
    from artlearn.budget import choose_size
    assert choose_size({48: 30, 64: 20, 80: 16, 96: 11}, target=16) == 80
    assert choose_size({48: 9}, target=16) == 48  # none reaches it: the smallest, where an epoch costs least
    assert choose_size({48: 40, 64: 30}, target=16) == 64
    with pytest.raises(ValueError, match="at least one size"):
        choose_size({}, target=16)


def test_size_for_budget_stops_at_the_first_size_short_of_the_target():
    from artlearn.budget import size_for_budget
    affordable = {48: 40, 64: 25, 80: 17, 96: 12, 112: 9, 128: 7}
    tried = []

    def epochs_at(size):
        tried.append(size)
        return affordable[size]
    size, planned = size_for_budget(epochs_at, 16, sizes=(128, 48, 96, 64, 80, 112))
    assert size == 80 and tried == [48, 64, 80, 96] and planned == {48: 40, 64: 25, 80: 17, 96: 12}
    tried.clear()
    assert size_for_budget(epochs_at, 50)[0] == 48 and tried == [48]


SIZED = {k: v for k, v in TINY.items() if k != "size"}


def _train_sized(df, out, **kw):
    """train_kfold on TINY settings but the size, quietly, collecting its log lines."""
    return quiet_train_kfold(df, out, SIZED, **kw)



SPEEDS = {16: 1.0, 24: 3.0, 32: 12.0}  # seconds per training batch at each size


def _speed_by_size(monkeypatch, batch_s: dict):
    """measure_speed replaced by fixed seconds per batch at each size (no re-plan from the folds' real times)."""
    def fake(build, sizes, bs):
        return Speed(train_batch_s={s: batch_s[s] for s in sizes}, eval_view_s=0.001, setup_s=0.1, bs=bs)
    monkeypatch.setattr(kfold_module, "measure_speed", fake)
    monkeypatch.setattr(FoldPlanner, "after_fold", lambda self, *args, **kw: None)
    monkeypatch.setattr("artlearn.budget.BUDGET_SIZES", tuple(sorted(batch_s)))


def test_budget_chooses_the_largest_size_that_keeps_the_recipe_epochs(table, tmp_path, monkeypatch):
    # 3 batches per epoch: 80 s affords about 12 epochs per fold at 16 px, 4 at 24 px, 1 at 32 px; the target is 2
    _speed_by_size(monkeypatch, SPEEDS)
    run, lines = _train_sized(table, tmp_path / "r", budget="80s", procs=1, epochs=2, size_by_budget=True)
    chosen = [line for line in lines if line.startswith("budget: training at 24 px")]
    assert chosen and "at 16 px" in chosen[0] and "at 32 px" in chosen[0]
    assert lines.index(chosen[0]) < next(i for i, line in enumerate(lines) if line.startswith("plan: 2 folds"))
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["size"] == 24 and config["size_by_budget"] is True and config["epochs"] is None
    assert {json.loads((tmp_path / "r" / f"fold{k}" / "meta.json").read_text())["size"] for k in (0, 1)} == {24}
    assert all(run.summary["timing"]["folds"][k]["epochs"] >= 2 for k in ("0", "1"))


def test_resumed_budget_run_keeps_the_size_it_chose(table, tmp_path, monkeypatch):
    _speed_by_size(monkeypatch, SPEEDS)
    _train_sized(table, tmp_path / "r", budget="80s", procs=1, folds=[0], epochs=2, size_by_budget=True)
    chosen = json.loads((tmp_path / "r" / "config.json").read_text())["size"]
    assert chosen in (24, 32)  # one fold per process affords more than two
    monkeypatch.setattr(kfold_module, "_choose_budget_size", lambda *a, **kw: pytest.fail("chose the size again"))
    run, lines = _train_sized(table, tmp_path / "r", budget="80s", procs=1, epochs=2, size_by_budget=True)
    assert any(line == f"budget: resuming at {chosen} px, the size this run's budget chose" for line in lines)
    assert not any(line.startswith("budget: training at") for line in lines)
    assert any("fold 0: complete checkpoint found" in line for line in lines)
    assert json.loads((tmp_path / "r" / "fold1" / "meta.json").read_text())["size"] == chosen


def test_an_explicit_size_is_the_size_trained(table, tmp_path, monkeypatch):
    _speed_by_size(monkeypatch, SPEEDS)
    _, lines = _train_sized(table, tmp_path / "r", budget="80s", procs=1, epochs=2, preset="fast", size=16,
)
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["size"] == 16 and config["size_by_budget"] is False
    assert not any(line.startswith("budget: training at") for line in lines)


def test_without_a_budget_size_by_budget_trains_the_recipe_size(table, tmp_path, monkeypatch):
    _speed_by_size(monkeypatch, SPEEDS)
    _, lines = _train_sized(table, tmp_path / "r", epochs=1, size_by_budget=True, size=16)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["size"] == 16
    assert not any(line.startswith("budget:") for line in lines)


def test_fold_processes_get_the_chosen_size_and_do_not_choose_again(table, tmp_path, monkeypatch):
    import torch.multiprocessing as mp
    _speed_by_size(monkeypatch, SPEEDS)
    spawned = {}

    def fake_start(fn, args, nprocs, start_method):
        spawned.update(kwargs=args[5], nprocs=nprocs)
    monkeypatch.setattr(mp, "start_processes", fake_start)
    monkeypatch.setattr(kfold_module, "load_run", lambda out: None)
    monkeypatch.setattr(kfold_module, "_choose_budget_size", lambda recipe, df, a, procs, todo: 24)
    al.train_kfold(table, tmp_path / "r", budget="80s", procs=2, epochs=2, size_by_budget=True, **SIZED)
    assert spawned["nprocs"] == 2
    kwargs = spawned["kwargs"]
    assert kwargs["size"] == 24 and kwargs["size_by_budget"] is True and kwargs["size_planned"] is True
