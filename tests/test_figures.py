"""figures.py on synthetic study directories whose statistics are known."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

import figures
from figures import SUMMARY_COLUMNS
from study import RESULTS as RESULTS_COLUMNS  # the columns study.py writes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPS = 200  # bootstrap resamples in tests (the CLI's default is 2000)


def make_study(root, runs, benchmark="procgen", metric="mean_return"):
    """A study directory: results.csv with one row per run dict, and runs/<id>/eval.csv from its
    `curve` [(step, value), ...] (None: no eval.csv; []: header only; status other than done: no file)."""
    os.makedirs(root / "runs", exist_ok=True)
    (root / "study.toml").write_text(f'benchmark = "{benchmark}"\n')
    with open(root / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, RESULTS_COLUMNS)
        w.writeheader()
        for r in runs:
            run_id = r.get("run_id") or "-".join(
                str(x) for x in (benchmark, r["method"], r.get("train_set", ""), r["task"], r.get("demos", ""),
                                 r["seed"]) if x != "")
            row = {c: "" for c in RESULTS_COLUMNS}
            row.update(run_id=run_id, stage="adapt", benchmark=benchmark, method=r["method"],
                       train_set=r.get("train_set", ""), task=r["task"], demos=r.get("demos", ""), seed=r["seed"],
                       status=r.get("status", "done"), command="python finetune.py ...")
            w.writerow(row)
            if r.get("curve") is not None and row["status"] == "done":
                os.makedirs(root / "runs" / run_id, exist_ok=True)
                with open(root / "runs" / run_id / "eval.csv", "w", newline="") as e:
                    ew = csv.writer(e)
                    ew.writerow(["env_step", metric, "episodes"])
                    for step, value in r["curve"]:
                        ew.writerow([step, value, 10])
    return root


def procgen_runs(levels=("10000", "10001"), seeds=(0, 1, 2), trains=("100",), methods=("mt", "reptile"), steps=3):
    """R(method, train, level, seed, k) = 5 + 0.5 k + 0.1 seed + 0.2 level-index (+0.3 for mt): known means."""
    runs = []
    for method in methods + ("scratch",):
        for train in (trains if method != "scratch" else ("",)):
            for li, level in enumerate(levels):
                for seed in seeds:
                    gain = {"mt": 0.5, "reptile": 0.4, "rl2": 0.1, "scratch": 0.35}.get(method, 0.5) * (
                        1 + 0.1 * len(train)) if len(levels) > 2 else 0.5  # render tests: lines apart
                    curve = [(k * 1000, 5 + gain * k + 0.1 * seed + 0.2 * li + 0.3 * (method == "mt"))
                             for k in range(steps)]
                    runs.append(dict(method=method, train_set=train, task=level, seed=seed, curve=curve))
    return runs


def test_curve_is_mean_and_stderr_over_seeds_of_the_level_average(tmp_path):
    study = make_study(tmp_path / "s", procgen_runs())
    runs, missing = figures.load_study(str(study))
    assert missing == [] and len(runs) == 3 * 2 * 3
    steps, mean, stderr, n = figures.curve([r for r in runs if r["method"] == "mt"])
    assert n == 3 and steps.tolist() == [0, 1000, 2000]
    # per seed, the level average of R is 5 + 0.5k + 0.1 seed + 0.1 + 0.3; normalised (R - 5) / 5
    per_seed = np.array([[(0.5 * k + 0.1 * s + 0.1 + 0.3) / 5 for k in range(3)] for s in range(3)])
    np.testing.assert_allclose(mean, per_seed.mean(0), atol=1e-12)
    # seeds differ by 0.1/5 = 0.02: std(ddof=1) of (0, 0.02, 0.04) is 0.02, stderr 0.02 / sqrt(3)
    np.testing.assert_allclose(stderr, np.full(3, 0.02 / np.sqrt(3)), atol=1e-12)
    one = figures.curve([r for r in runs if r["method"] == "mt" and r["seed"] == "0"])
    assert one[3] == 1 and np.isnan(one[2]).all()  # one seed: no shading


def test_coinrun_normalisation_and_atari_human_normalisation():
    np.testing.assert_allclose(figures.curve_scale("procgen", np.array([5.0, 7.5, 10.0, 0.0])), [0, 0.5, 1, -1])
    np.testing.assert_allclose(figures.curve_scale("atari", np.array([-21.0, 3.0])), [-21.0, 3.0])  # raw
    for name in ("Pong", "pong", "ALE/Pong-v5", "PongNoFrameskip-v4"):
        np.testing.assert_allclose(figures.aggregate_scale("atari", name, np.array([-20.7, 14.6])), [0, 1])
    for name in ("MsPacman", "ms_pacman", "ALE/MsPacman-v5"):
        np.testing.assert_allclose(figures.aggregate_scale("atari", name, np.array([307.3, 6951.6])), [0, 1])
    assert figures.aggregate_scale("atari", "Tetris", np.array([1.0])) is None


def test_run_scores_come_from_the_curve():
    s = figures.run_scores(np.array([0.0, 10, 20, 30]), np.array([1.0, 2, 4, 5]))
    assert s == dict(zero_shot=1.0, final=5.0, auc=3.0)
    assert np.isnan(figures.run_scores(np.array([10.0]), np.array([1.0]))["zero_shot"])


def test_iqm_against_a_hand_computation():
    assert figures.iqm(np.arange(1, 9)) == pytest.approx((3 + 4 + 5 + 6) / 4)
    x = np.random.default_rng(0).normal(size=40)
    middle = np.sort(x)[10:30]
    assert figures.iqm(x) == pytest.approx(middle.mean())
    assert figures.iqm(x) == pytest.approx(scipy.stats.trim_mean(x, 0.25))


def test_bootstrap_intervals_contain_the_iqm_and_shrink_with_more_runs():
    rng = np.random.default_rng(0)
    widths = []
    for n in (5, 100):
        per_task = [rng.normal(loc=t, size=n) for t in range(3)]
        point, ci = figures.interval_estimates(per_task, REPS, seed=0)
        pooled = np.concatenate(per_task)
        np.testing.assert_allclose(point, [np.median(pooled), figures.iqm(pooled), pooled.mean()])
        assert (ci[0] <= point).all() and (point <= ci[1]).all()
        widths.append(ci[1, 1] - ci[0, 1])
        # seeded: the same intervals again
        np.testing.assert_array_equal(figures.interval_estimates(per_task, REPS, seed=0)[1], ci)
    assert widths[1] < widths[0] / 2


def test_probability_of_improvement_matches_rliable():
    from rliable import metrics

    rng = np.random.default_rng(2)
    xs = [rng.normal(0.5, 1, size=5) for _ in range(3)]
    ys = [rng.normal(0.0, 1, size=4) for _ in range(3)]
    p, lo, hi = figures.improvement_probability(xs, ys, REPS, seed=0)
    assert p == pytest.approx(metrics.probability_of_improvement(np.stack(xs, 1), np.stack(ys, 1)))
    assert lo <= p <= hi
    p, lo, hi = figures.improvement_probability([np.array([2.0, 3.0])], [np.array([0.0, 1.0])], REPS, seed=0)
    assert (p, lo, hi) == (1.0, 1.0, 1.0)


def test_different_step_grids_are_interpolated_up_to_the_shortest_run(tmp_path):
    runs = [dict(method="mt", train_set="100", task="10000", seed=0, curve=[(0, 5), (10, 7), (20, 9), (30, 10)]),
            dict(method="mt", train_set="100", task="10001", seed=0, curve=[(0, 5), (5, 6), (20, 10)])]
    loaded, _ = figures.load_study(str(make_study(tmp_path / "s", runs)))
    steps, mean, _, n = figures.curve(loaded)
    assert steps.tolist() == [0, 5, 10, 20]  # union of steps, none past 20 (the shorter run's end)
    a, b = np.array([5, 6, 7, 9]), np.array([5, 6, 22 / 3, 10])
    np.testing.assert_allclose(mean, ((a + b) / 2 - 5) / 5)


def test_summary_csv_columns_and_values(tmp_path):
    study = make_study(tmp_path / "s", procgen_runs())
    out = tmp_path / "out"
    figures.main(["--study-dir", str(study), "--out", str(out), "--format", "png", "--reps", str(REPS)])
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == SUMMARY_COLUMNS
    table = {(r[1], r[2], r[3]): dict(zip(SUMMARY_COLUMNS, r)) for r in rows[1:]}
    assert set(table) == {(t, m, s) for t, m in (("100 levels", "mt"), ("100 levels", "reptile"), ("", "scratch"))
                          for s in ("final", "auc", "zero_shot")}
    mt = table[("100 levels", "mt", "final")]
    # final R = 5 + 1.0 + 0.1 seed + 0.2 li + 0.3 -> normalised (1.3 + 0.1 seed + 0.2 li) / 5
    finals = np.array([(1.3 + 0.1 * s + 0.2 * li) / 5 for s in range(3) for li in range(2)])
    assert int(mt["n_runs"]) == 6
    assert float(mt["mean"]) == pytest.approx(finals.mean(), rel=1e-5)
    assert float(mt["stderr"]) == pytest.approx(0.02 / np.sqrt(3), rel=1e-5)
    assert float(mt["iqm"]) == pytest.approx(scipy.stats.trim_mean(finals, 0.25), rel=1e-5)
    assert float(mt["iqm_low"]) <= float(mt["iqm"]) <= float(mt["iqm_high"])
    assert float(table[("", "scratch", "zero_shot")]["mean"]) == pytest.approx((0.1 + 0.1) / 5, rel=1e-5)
    md = (out / "summary.md").read_text()
    assert "P(MT > X)" in md and "PPO from scratch" in md and "none: the grid is complete" in md


def test_partial_grid_and_run_without_eval_rows_are_reported(tmp_path, capsys):
    runs = procgen_runs(seeds=(0, 1))
    runs = [r for r in runs if not (r["method"] == "reptile" and r["seed"] == 1 and r["task"] == "10001")]  # hole
    runs[0]["status"] = "failed"
    runs[1]["status"] = "pending"
    runs[2]["curve"] = []  # done, header only
    runs[3]["curve"] = None  # done, no eval.csv
    study = make_study(tmp_path / "s", runs)
    out = tmp_path / "out"
    main_fig = figures.main(["--study-dir", str(study), "--out", str(out), "--format", "png", "--reps", str(REPS)])
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1] == main_fig == str(out / "fig4.png")
    md = (out / "summary.md").read_text()
    for text in ("failed", "pending", "eval.csv has no evaluation rows", "has no eval.csv",
                 "reptile, 100 levels, task 10001, seed 1): not in results.csv"):
        assert text in md and text in printed
    assert os.path.getsize(out / "fig4.png") > 0


def test_older_two_column_eval_csv(tmp_path):
    path = tmp_path / "eval.csv"
    path.write_text("env_step,mean_return\n0,5\n1000,7.5\n")
    metric, steps, values = figures.read_eval(str(path))
    assert metric == "mean_return" and steps.tolist() == [0, 1000] and values.tolist() == [5, 7.5]


def test_missing_study_dir_and_missing_results_are_one_line_errors(tmp_path):
    for study in (tmp_path / "nope", tmp_path):
        out = tmp_path / "out"
        p = subprocess.run([sys.executable, os.path.join(ROOT, "figures.py"), "--study-dir", str(study),
                            "--out", str(out)], capture_output=True, text=True)
        assert p.returncode != 0
        assert p.stderr.startswith("figures.py: error:") and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert not out.exists()


def rlbench_runs():
    runs = []
    for method in ("mt", "reptile", "pearl", "scratch"):
        for task in ("drawer-open-v3", "door-close-v3"):
            for demos in ("0", "1", "2"):
                for seed in range(3):
                    base = {"mt": 0.5, "reptile": 0.35, "pearl": 0.1, "scratch": 0.2}[method] + 0.1 * int(demos)
                    curve = [(k * 500, min(1.0, base * k / 4 + 0.05 * seed)) for k in range(5)]
                    runs.append(dict(method=method, train_set="" if method == "scratch" else "ml10", task=task,
                                     demos=demos, seed=seed, curve=curve))
    return runs


def atari_runs():
    runs = []
    games = {"Pong": (-21, 15), "Assault": (220, 800), "BattleZone": (2000, 12000), "MsPacman": (300, 1300),
             "BeamRider": (360, 2000)}
    for method in ("mt", "reptile", "pearl", "scratch"):
        for train in (("1", "5", "10") if method != "scratch" else ("",)):
            for game, (lo, hi) in games.items():
                for seed in range(2):
                    gain = {"mt": 0.6, "reptile": 0.5, "pearl": 0.1, "scratch": 0.45}[method] + 0.05 * int(train or 0)
                    curve = [(k * 10000, lo + (hi - lo) * gain * k / 10 + 0.05 * (hi - lo) * seed * (k > 0))
                             for k in range(11)]
                    runs.append(dict(method=method, train_set=train, task=game, seed=seed, curve=curve))
    return runs


def with_noise(runs, scale, seed=0):
    """Seed-to-seed noise, so that the shading of the rendered figures shows."""
    rng = np.random.default_rng(seed)
    for r in runs:
        r["curve"] = [(step, v + scale * rng.normal() * (step > 0)) for step, v in r["curve"]]
    return runs


@pytest.mark.parametrize("benchmark", ["procgen", "rlbench", "atari"])
def test_renders_each_benchmark(tmp_path, benchmark, capsys):
    runs = {"procgen": lambda: with_noise(procgen_runs(levels=[str(10000 + i) for i in range(4)], trains=(
                "100", "1000", "10000"), methods=("mt", "reptile", "rl2"), steps=9), 0.5),
            "rlbench": lambda: with_noise(rlbench_runs(), 0.08), "atari": lambda: with_noise(atari_runs(), 0)}[
        benchmark]()
    metric = "success_rate" if benchmark == "rlbench" else "mean_return"
    study = make_study(tmp_path / "study", runs, benchmark=benchmark, metric=metric)
    out = os.environ.get("FIGURES_TEST_OUT")  # set it to keep the PNGs and look at them
    out = os.path.join(out, benchmark) if out else str(tmp_path / "study" / "figures")
    formats = ["png", "pdf"] if benchmark == "procgen" else ["png"]  # PDF once: it costs time
    main_fig = figures.main(["--study-dir", str(study), "--out", out, "--format", *formats, "--reps", "50"])
    expected = {"procgen": ["fig4"], "rlbench": ["fig6"], "atari": ["fig8_1_game", "fig8_5_games", "fig8_10_games"]}
    for stem in expected[benchmark] + [f"aggregates_{benchmark}", f"profiles_{benchmark}"]:
        for ext in formats:
            assert os.path.getsize(os.path.join(out, f"{stem}.{ext}")) > 0, stem
    assert main_fig == os.path.join(out, expected[benchmark][0] + ".png")
    assert capsys.readouterr().out.strip().splitlines()[-1] == main_fig


@pytest.mark.parametrize("name", ["loo-{task}", "list"])
def test_rlbench_leave_one_out_sets_pool_into_one_group(tmp_path, name):
    tasks = ["push_button", "reach_target", "lamp_on"]
    runs = []
    for task in tasks:
        others = ",".join(t for t in tasks if t != task)
        for method in ("mt", "scratch"):
            for seed in (0, 1):
                train = "" if method == "scratch" else (others if name == "list" else name.format(task=task))
                runs.append(dict(method=method, train_set=train, task=task, demos="1", seed=seed,
                                 curve=[(0, 0.0), (100, 0.5 + 0.1 * seed + 0.2 * (method == "mt"))]))
    study = make_study(tmp_path / "s", runs, benchmark="rlbench", metric="success_rate")
    loaded, missing = figures.load_study(str(study))
    assert missing == []
    summary, poi, _, _ = figures.aggregate(loaded, REPS, seed=0)
    label = "2 tasks, 1 demo" if name == "list" else "leave-one-out, 1 demo"
    final = {(s["train_set"], s["method"]): s for s in summary if s["score"] == "final"}
    assert set(final) == {(label, "mt"), ("1 demo", "scratch")}
    assert final[(label, "mt")]["n_runs"] == 6 and final[(label, "mt")]["mean"] == pytest.approx(0.75)
    assert [(p["train_set"], p["other"], p["score"], p["p"], p["tasks"]) for p in poi if p["score"] == "final"] == [
        (label, "scratch", "final", 1.0, 3)]


def test_a_study_with_nothing_finished_writes_the_missing_list(tmp_path, capsys):
    runs = [dict(method="mt", train_set="100", task="10000", seed=s, status="pending") for s in (0, 1)]
    study = make_study(tmp_path / "s", runs)
    assert figures.main(["--study-dir", str(study), "--reps", str(REPS)]) is None
    assert "nothing to draw" in capsys.readouterr().out
    md = (study / "figures" / "summary.md").read_text()
    assert md.count(": pending") == 2
    assert (study / "figures" / "summary.csv").read_text().strip() == ",".join(SUMMARY_COLUMNS)


def test_training_set_labels():
    assert figures.train_label("procgen", "100") == "100 levels"
    assert figures.train_label("atari", "1") == "1 game"
    assert figures.train_label("atari", "Breakout") == "1 game"  # the paired source game
    assert figures.train_label("atari", "5games") == "5 games"
    assert figures.train_label("atari", "Breakout,DemonAttack,Robotank,BankHeist,Solaris") == "5 games"
    assert figures.train_label("rlbench", "ml10") == "ml10"
    assert figures.train_label("rlbench", "reach_target,push_button") == "2 tasks"
    assert figures.train_label("procgen", "") == ""
