"""Figures 4, 6 and 8 of Mandi, Abbeel & James (NeurIPS 2022) and sound aggregate statistics, from a study directory.

    python figures.py --study-dir DIR [--out DIR/figures] [--format png pdf] [--reps 2000] [--seed 0]

Reads DIR/results.csv and each finished adaptation run's eval.csv, listing what is missing (a partial
study draws what it has); scores each run from its own curve (zero_shot = the point at step 0, final =
the last, auc = the mean); draws the paper's curves (per seed the mean over held-out tasks, then mean +-
one standard error over seeds: Figure 4 Procgen, 6 RLBench, 8 Atari) and Agarwal et al. 2021's aggregates
with rliable (median, IQM, mean with 95% stratified bootstrap CIs, P(MT > X), performance profiles; Atari
human-normalised); writes them, summary.csv and summary.md into --out, the main figure's path printed last.
"""

import argparse
import csv
import math
import os
import re
import sys
from collections import defaultdict

import numpy as np

SUMMARY_COLUMNS = ["benchmark", "train_set", "method", "score", "n_runs", "mean", "stderr", "iqm", "iqm_low",
                   "iqm_high", "median"]
SCORES = ("final", "auc", "zero_shot")
METHODS = ("mt", "reptile", "rl2", "pearl", "scratch")  # drawing order; unknown methods follow
COLORS = {"mt": "#0072B2", "reptile": "#E69F00", "rl2": "#009E73", "pearl": "#CC79A7", "scratch": "#555555"}
# line style and marker per method too: curves that coincide (all at 0 success, say) stay distinguishable
STYLES = {"mt": ("-", "o"), "reptile": ("--", "s"), "rl2": ("-.", "^"), "pearl": ("-.", "^"), "scratch": (":", "D")}
BASE_ALGO = {"procgen": "PPO", "atari": "Rainbow", "rlbench": "C2F-ARM"}
UNIT = {"procgen": ("level", "levels"), "atari": ("game", "games"), "rlbench": ("task", "tasks")}

# CoinRun's normalised return y = (R - 5) / 5: its range [5, 10] in openai/train-procgen (Cobbe et al. 2020)
COINRUN_MIN, COINRUN_MAX = 5.0, 10.0

# (random, human) scores of the test games: Mnih et al. 2015's table (Agent57's App. H, dqn_zoo's atari_data.py)
ATARI_RANDOM_HUMAN = {
    "pong": (-20.7, 14.6),
    "assault": (222.4, 742.0),
    "battlezone": (2360.0, 37187.5),
    "mspacman": (307.3, 6951.6),
    "beamrider": (363.9, 16926.5),
}


def fail(message: str) -> None:
    sys.exit(f"figures.py: error: {message}")


# --------------------------------------------------------------------------- reading a study


def read_results(study_dir: str) -> list[dict]:
    """results.csv as a list of dicts; a one-line error if the file is missing or not one of ours."""
    if not os.path.isdir(study_dir):
        fail(f"study directory '{study_dir}' does not exist")
    path = os.path.join(study_dir, "results.csv")
    if not os.path.isfile(path):
        fail(f"'{study_dir}' has no results.csv (is it a study directory written by study.py?)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        absent = [c for c in ("run_id", "stage", "benchmark", "method", "train_set", "task", "demos", "seed",
                              "status") if c not in (reader.fieldnames or [])]
        if absent:
            fail(f"{path} lacks the column(s) {', '.join(absent)}")
        return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def read_eval(path: str) -> tuple[str, np.ndarray, np.ndarray]:
    """eval.csv -> (metric, steps, values), sorted by step; FileNotFoundError, or ValueError if malformed."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or len(rows[0]) < 2 or rows[0][0] != "env_step":
        raise ValueError("no `env_step,<metric>` header")
    points = [(float(r[0]), float(r[1])) for r in rows[1:] if len(r) >= 2 and r[1].strip()]
    points.sort(key=lambda p: p[0])
    steps = np.array([p[0] for p in points], dtype=float)
    return rows[0][1], steps, np.array([p[1] for p in points], dtype=float)


def train_label(benchmark: str, train_set: str) -> str:
    """'100' -> '100 levels'; a list of 10 tasks -> '10 tasks' (RLBench's leave-one-out sets: one name)."""
    if not train_set:
        return ""
    one, many = UNIT.get(benchmark, ("task", "tasks"))
    counted = re.fullmatch(r"(\d+)[-_ ]?[A-Za-z]*", train_set)  # '100', '5games', '10-games'
    if counted:
        n = int(counted.group(1))
    else:
        items = [s for s in re.split(r"[,;+| ]+", train_set) if s]
        if len(items) == 1 and benchmark != "atari":
            return train_set  # a named set, e.g. a Meta-World benchmark name
        n = len(items)
    return f"{n} {one if n == 1 else many}"


def label_order(label: str):
    m = re.match(r"(\d+)", label)
    return (0, int(m.group(1)), label) if m else (1, 0, label)


def method_order(method: str):
    return (METHODS.index(method) if method in METHODS else len(METHODS), method)


def method_name(benchmark: str, method: str) -> str:
    base = BASE_ALGO.get(benchmark, "")
    if method == "scratch":
        return f"{base} from scratch".strip()
    pretty = {"mt": "MT", "reptile": "Reptile", "rl2": "RL2", "pearl": "PEARL"}.get(method, method)
    return f"{pretty}-{base}" if base else pretty


def load_study(study_dir: str) -> tuple[list[dict], list[str]]:
    """The finished adaptation runs with their curves, and the list of what is missing or unusable."""
    rows = [r for r in read_results(study_dir) if r.get("stage", "adapt") == "adapt"]
    runs, missing = [], []
    for row in rows:
        if row["status"] != "done":
            missing.append(f"{row['run_id']}: {row['status'] or 'no status'}")
            continue
        path = os.path.join(study_dir, "runs", row["run_id"], "eval.csv")
        try:
            metric, steps, values = read_eval(path)
            problem = "" if len(steps) else "done, but eval.csv has no evaluation rows"
        except FileNotFoundError:
            problem = "done, but has no eval.csv"
        except ValueError as e:
            problem = f"unreadable eval.csv ({e})"
        if problem:
            missing.append(f"{row['run_id']}: {problem}")
            continue
        demos = row["demos"] if row["benchmark"] == "rlbench" else ""
        runs.append(dict(run_id=row["run_id"], benchmark=row["benchmark"], method=row["method"],
                         train=train_label(row["benchmark"], row["train_set"]), task=row["task"],
                         demos=demos, seed=row["seed"], metric=metric, steps=steps, values=values))
    return merge_one_task_sets(runs), missing + grid_holes(rows)


def merge_one_task_sets(runs: list[dict]) -> list[dict]:
    """Training sets that each serve exactly one held-out task (RLBench's leave-one-out) become one group."""
    for bench in {r["benchmark"] for r in runs}:
        mine = [r for r in runs if r["benchmark"] == bench and r["train"]]
        tasks_of = defaultdict(set)
        for r in mine:
            tasks_of[r["train"]].add(r["task"])
        one_each = all(len(t) == 1 for t in tasks_of.values())
        if bench != "atari" and len(tasks_of) > 1 and one_each and len(set.union(*tasks_of.values())) == len(tasks_of):
            for r in mine:
                r["train"] = "leave-one-out"
    return runs


def grid_holes(rows: list[dict]) -> list[str]:
    """Runs the grid implies (method x its training set's tasks x demos x seed; scratch: all tasks) but lacks."""
    holes = []
    for bench in sorted({r["benchmark"] for r in rows}):
        mine = [r for r in rows if r["benchmark"] == bench]
        seeds, demos = sorted({r["seed"] for r in mine}, key=label_order), sorted({r["demos"] for r in mine})
        tasks_of, methods_of = defaultdict(set), defaultdict(set)
        for r in mine:
            tasks_of[r["train_set"]].add(r["task"])
            methods_of[r["train_set"]].add(r["method"])
        tasks_of[""] = {r["task"] for r in mine}  # scratch adapts to every task of the study
        have = {(r["method"], r["train_set"], r["demos"], r["task"], r["seed"]) for r in mine}
        for train in sorted(methods_of):
            for method in sorted(methods_of[train], key=method_order):
                for task in sorted(tasks_of[train]):
                    for d in demos:
                        for seed in seeds:
                            if (method, train, d, task, seed) not in have:
                                what = ", ".join(x for x in (bench, method, train_label(bench, train) or train,
                                                             f"{d} demos" if d else "", f"task {task}",
                                                             f"seed {seed}") if x)
                                holes.append(f"({what}): not in results.csv")
    return holes


# --------------------------------------------------------------------------- scores per run


def curve_scale(benchmark: str, values: np.ndarray) -> np.ndarray:
    """What the paper's curves show: CoinRun's (R - 5) / 5; Atari's raw score; RLBench's success rate."""
    if benchmark == "procgen":
        return (values - COINRUN_MIN) / (COINRUN_MAX - COINRUN_MIN)
    return values


def atari_game_key(task: str) -> str:
    """'MsPacman', 'ms_pacman', 'ALE/MsPacman-v5', 'MsPacmanNoFrameskip-v4' -> 'mspacman'."""
    name = re.sub(r"^ALE/|-v\d+$|NoFrameskip|Deterministic", "", task)
    return name.replace("_", "").lower()


def aggregate_scale(benchmark: str, task: str, values: np.ndarray) -> np.ndarray | None:
    """The aggregates' scale: Atari's (score - random) / (human - random), None without references; else the curves'."""
    if benchmark == "atari":
        ref = ATARI_RANDOM_HUMAN.get(atari_game_key(task))
        return None if ref is None else (values - ref[0]) / (ref[1] - ref[0])
    return curve_scale(benchmark, values)


def run_scores(steps: np.ndarray, values: np.ndarray) -> dict:
    """zero_shot = the point at step 0 (NaN without one), final = the last point, auc = the mean of all."""
    return dict(zero_shot=float(values[0]) if steps[0] == 0 else math.nan,
                final=float(values[-1]), auc=float(np.mean(values)))


# --------------------------------------------------------------------------- curves


def mean_stderr(per_seed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over seeds (axis 0) and its standard error std(ddof=1) / sqrt(n); NaN (no shading) for n=1."""
    n = per_seed.shape[0]
    mean = per_seed.mean(axis=0)
    stderr = per_seed.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.full_like(mean, np.nan)
    return mean, stderr


def curve(runs: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(steps, mean, stderr, n_seeds) on the paper's scale: per seed the mean over runs (tasks), then over seeds.
    Runs are interpolated onto the union of their steps up to the last all reached (never extrapolated)."""
    end = min(r["steps"][-1] for r in runs)
    grid = np.unique(np.concatenate([r["steps"][r["steps"] <= end] for r in runs]))
    by_seed = defaultdict(list)
    for r in runs:
        by_seed[r["seed"]].append(np.interp(grid, r["steps"], curve_scale(r["benchmark"], r["values"])))
    per_seed = np.stack([np.mean(v, axis=0) for v in by_seed.values()])
    mean, stderr = mean_stderr(per_seed)
    return grid, mean, stderr, len(by_seed)


# --------------------------------------------------------------------------- aggregates (rliable)


def iqm(x: np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50% (rliable's aggregate_iqm, a 25% trimmed mean)."""
    import scipy.stats

    return float(scipy.stats.trim_mean(np.asarray(x).ravel(), proportiontocut=0.25))


def _median_iqm_mean(*per_task: np.ndarray) -> np.ndarray:
    x = np.concatenate(per_task)
    return np.array([np.median(x), iqm(x), np.mean(x)])


def bootstrap(per_task: list[np.ndarray], statistic, reps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`statistic(*per_task)` and its 95% stratified bootstrap CI (runs resampled within each task), by rliable.

    The scores go to rliable as one array per task, so a partial grid with different seed counts per
    task stays stratified. rliable's bootstrap draws from numpy's global generator (its
    `random_state` does not reach the resampling), so that generator is seeded here."""
    from rliable import library as rly

    np.random.seed(seed)
    point, ci = rly.get_interval_estimates({"x": per_task}, statistic, reps=reps)
    return point["x"], ci["x"]


def interval_estimates(per_task: list[np.ndarray], reps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Median, IQM and mean of all runs pooled, with 95% CIs: (point[3], ci[2, 3])."""
    return bootstrap(per_task, _median_iqm_mean, reps, seed)


def improvement_probability(xs: list[np.ndarray], ys: list[np.ndarray], reps: int, seed: int) -> tuple:
    """P(X > Y), the chance that a run of X beats a run of Y on the same task averaged over tasks (rliable's
    probability_of_improvement), with its 95% CI; xs[i] and ys[i] are the scores of X and Y on task i."""
    from rliable import metrics

    point = float(np.mean([metrics.probability_of_improvement(x[:, None], y[:, None]) for x, y in zip(xs, ys)]))

    def poi(*arrays):  # the same statistic, pairwise (Mann-Whitney U / (n_x n_y), ties count 1/2): fast
        k = len(arrays) // 2
        return np.array([np.mean([np.mean((x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :]))
                                  for x, y in zip(arrays[:k], arrays[k:])])])

    _, ci = bootstrap(list(xs) + list(ys), poi, reps, seed)
    return point, float(ci[0, 0]), float(ci[1, 0])


def performance_profile(per_task: list[np.ndarray], taus: np.ndarray, reps: int, seed: int) -> tuple:
    """Fraction of runs with a score above each tau (rliable's score distribution), with 95% CIs."""

    def profile(*cols):
        return (np.concatenate(cols)[:, None] > taus[None, :]).mean(axis=0)

    return bootstrap(per_task, profile, reps, seed)


def group_key(run: dict) -> tuple[str, str]:
    """(training-set label, method): the unit the aggregates pool over tasks and seeds (RLBench: with demos)."""
    train = run["train"]
    if run["benchmark"] == "rlbench":
        d = run["demos"] or "?"
        train = ", ".join(x for x in (train, f"{d} demo" + ("" if d == "1" else "s")) if x)
    return train, run["method"]


def comparison_sets(groups: dict) -> list[str]:
    """The training-set labels a comparison is made for (scratch's own label excluded where others exist)."""
    labels = sorted({t for t, m in groups if m != "scratch"}, key=label_order)
    return labels or sorted({t for t, _ in groups}, key=label_order)


def scratch_label(benchmark: str, label: str) -> str:
    """Scratch's group label that goes with a pretrained group's label (RLBench: the same demos)."""
    return label.split(", ")[-1] if benchmark == "rlbench" and ", " in label else ""


def entry_order(benchmark: str, keys) -> list[tuple[str, str]]:
    """By training set: methods in METHODS order, then its own scratch (RLBench: same demos); shared scratch last."""
    keys, ordered = set(keys), []
    for train in comparison_sets(keys):
        ordered += sorted((k for k in keys if k[0] == train and k[1] != "scratch"), key=lambda k: method_order(k[1]))
        base = (scratch_label(benchmark, train), "scratch")
        if base[0] and base in keys and base not in ordered:
            ordered.append(base)
    return ordered + sorted(keys - set(ordered), key=lambda k: (label_order(k[0]), method_order(k[1])))


def aggregate(runs: list[dict], reps: int, seed: int) -> tuple[list[dict], list[dict], dict, list[str]]:
    """summary rows, probability-of-improvement rows, the per-task score arrays, and notes."""
    notes, groups = [], defaultdict(lambda: defaultdict(list))  # groups[key][score] = [(task, seed, value)]
    for r in runs:
        scaled = aggregate_scale(r["benchmark"], r["task"], r["values"])
        if scaled is None:
            note = f"no random/human scores for Atari game '{r['task']}': its runs are left out of the aggregates"
            notes += [note] if note not in notes else []
            continue
        for score, value in run_scores(r["steps"], scaled).items():
            if not math.isnan(value):
                groups[group_key(r)][score].append((r["task"], r["seed"], value))
    per_task, summary = {}, []
    bench = runs[0]["benchmark"] if runs else ""
    for (train, method) in entry_order(bench, groups):
        for score in SCORES:
            triples = groups[(train, method)][score]
            if not triples:
                continue
            by_task, by_seed = defaultdict(list), defaultdict(list)
            for task, s, v in triples:
                by_task[task].append(v)
                by_seed[s].append(v)
            cols = {t: np.array(v) for t, v in sorted(by_task.items())}
            per_task[(train, method, score)] = cols
            # mean and stderr as the curves: per seed the mean over tasks, then over seeds
            mean, stderr = mean_stderr(np.array([[np.mean(v)] for v in by_seed.values()]))
            point, ci = interval_estimates(list(cols.values()), reps, seed)
            summary.append(dict(train_set=train, method=method, score=score, n_runs=len(triples),
                                mean=float(mean[0]), stderr=float(stderr[0]), iqm=point[1], iqm_low=ci[0, 1],
                                iqm_high=ci[1, 1], median=point[0], median_ci=(ci[0, 0], ci[1, 0]),
                                mean_pooled=point[2], mean_ci=(ci[0, 2], ci[1, 2])))
    poi = []
    for train in comparison_sets(groups):
        base = scratch_label(bench, train)  # scratch's group for this training set
        rivals = [(train, m) for m in sorted({m for t, m in groups if t == train}, key=method_order) if m != "mt"]
        rivals += [(base, "scratch")] if base != train and (base, "scratch") in groups else []
        for score in ("final", "auc"):
            mt = per_task.get((train, "mt", score))
            for rival_train, rival in rivals:
                ys = per_task.get((rival_train, rival, score))
                common = sorted(set(mt or {}) & set(ys or {}))
                if not common:
                    continue
                p, lo, hi = improvement_probability([mt[t] for t in common], [ys[t] for t in common], reps, seed)
                poi.append(dict(train_set=train, score=score, other=rival, p=p, low=lo, high=hi, tasks=len(common)))
    return summary, poi, per_task, notes


# --------------------------------------------------------------------------- figures


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.spines.top": False,
                         "axes.spines.right": False, "legend.frameon": False})
    return plt


def _steps_label(x, _pos=None) -> str:
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:g}{suffix}"
    return f"{x:g}"


NOTES: list[str] = []  # what a reader of the figures should know (curves cut short); printed by main
SCALE_NAME = {"procgen": "normalised return (R − 5) / 5", "atari": "human-normalised score", "rlbench": "success rate"}
CURVE_Y = {"procgen": "normalised return (R − 5) / 5", "atari": "score (raw game return)", "rlbench": "success rate"}


def draw_panel(ax, runs: list[dict], benchmark: str, title: str, xlabel: bool = True) -> None:
    """One panel: a line per method (mean over seeds of the task-average), shaded +- standard error."""
    from matplotlib.ticker import FuncFormatter

    for method in sorted({r["method"] for r in runs}, key=method_order):
        group = [r for r in runs if r["method"] == method]
        ends = sorted(r["steps"][-1] for r in group)
        if ends[0] < ends[-1]:
            NOTES.append(f"{benchmark} '{title.splitlines()[0]}', {method}: a run ends at step {ends[0]:.0f}, "
                         f"others at {ends[-1]:.0f}; the curve stops at {ends[0]:.0f}")
        steps, mean, stderr, n = curve(group)
        color = COLORS.get(method)
        linestyle, marker = STYLES.get(method, ("-", "o"))
        ax.plot(steps, mean, color=color, lw=1.8, ls=linestyle, marker=marker if len(steps) <= 12 else None,
                ms=4, mfc="none", label=method_name(benchmark, method))
        if n > 1:
            ax.fill_between(steps, mean - stderr, mean + stderr, color=color, alpha=0.25, lw=0)
    ax.set_title(title)
    ax.xaxis.set_major_formatter(FuncFormatter(_steps_label))
    if xlabel:
        ax.set_xlabel("adaptation env steps")
    ax.grid(alpha=0.3)


def save(fig, out: str, stem: str, formats, title: str, subtitle: str = "", legend: list | None = None) -> list:
    """Title (wrapped to the figure's width), one legend under the panels, tight layout, one file per format."""
    import textwrap

    plt = _matplotlib()
    width, height = fig.get_size_inches()
    bottom = 0.0
    if legend:
        handles, labels = legend
        ncol = max(1, min(len(labels), int(width // 2.4)))
        fig.legend(handles, labels, loc="lower center", ncol=ncol, bbox_to_anchor=(0.5, 0.0))
        bottom = (0.3 * math.ceil(len(labels) / ncol) + 0.15) / height
    text = textwrap.fill(title, int(width * 9))
    if subtitle:
        text += "\n" + textwrap.fill(subtitle, int(width * 11))
    fig.suptitle(text, fontsize=11)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    paths = [os.path.join(out, f"{stem}.{ext}") for ext in formats]
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return paths


def legend_of(axes, benchmark: str) -> list:
    """The handles of all methods drawn in any of the axes, in METHODS order."""
    handles = {}
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    order = [method_name(benchmark, m) for m in sorted(METHODS, key=method_order)]
    order += sorted(set(handles) - set(order))
    return [[handles[o] for o in order if o in handles], [o for o in order if o in handles]]


def seeds_note(runs: list[dict]) -> str:
    n = sorted({len({r["seed"] for r in runs if r["method"] == m}) for m in {r["method"] for r in runs}})
    seeds = f"{n[0]}" if len(n) == 1 else f"{n[0]}-{n[-1]}"
    if n[-1] == 1:
        return "One seed: no standard error to shade."
    return f"Mean over {seeds} seeds, shaded ± one standard error" + (" (none with one seed)." if n[0] == 1 else ".")


def figure_curves(benchmark: str, runs: list[dict], out: str, formats) -> list[str]:
    """Figure 4 (procgen), 6 (rlbench) or 8 (atari, one file per training set)."""
    plt = _matplotlib()
    scratch = [r for r in runs if r["method"] == "scratch"]
    trains = sorted({r["train"] for r in runs if r["method"] != "scratch"}, key=label_order) or [""]
    with_scratch = lambda train: [r for r in runs if r["train"] == train and r["method"] != "scratch"] + scratch
    if benchmark == "procgen":
        fig, axes = plt.subplots(1, len(trains), figsize=(max(4.2 * len(trains), 6), 3.6), squeeze=False,
                                 sharey=True)  # shared y: the panels compare training-set sizes
        for ax, train in zip(axes[0], trains):
            panel = with_scratch(train)
            n = len({r["task"] for r in panel})
            draw_panel(ax, panel, benchmark, f"{'pretrained on ' + train if train else 'from scratch only'}\n"
                       f"(mean over {n} test level{'s' if n > 1 else ''})")
        axes[0][0].set_ylabel(CURVE_Y[benchmark])
        return save(fig, out, "fig4", formats, "CoinRun: adaptation to held-out levels", seeds_note(runs),
                    legend_of(axes, benchmark))
    if benchmark == "rlbench":
        demos = sorted({r["demos"] for r in runs}, key=label_order)
        tasks = sorted({r["task"] for r in runs})
        fig, axes = plt.subplots(len(demos), len(tasks), figsize=(max(3.4 * len(tasks), 6), 2.8 * len(demos) + 0.9),
                                 squeeze=False, sharey=True, sharex="col")
        for i, d in enumerate(demos):
            for j, task in enumerate(tasks):
                panel, ax = [r for r in runs if r["demos"] == d and r["task"] == task], axes[i][j]
                title = task.replace("_", " ") if i == 0 else ""
                if panel:
                    draw_panel(ax, panel, benchmark, title, xlabel=i == len(demos) - 1)
                else:
                    ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
                    ax.set_title(title)
                ax.set_ylim(-0.05, 1.05)
            axes[i][0].set_ylabel(f"{d or '?'} demo{'' if d == '1' else 's'}\nsuccess rate")
        return save(fig, out, "fig6", formats, "RLBench: adaptation to each held-out task, rows = demos given",
                    seeds_note(runs), legend_of(axes, benchmark))
    if benchmark == "atari":
        # the paper's order of the test games (the table above), unknown games after
        known = list(ATARI_RANDOM_HUMAN)
        games = sorted({r["task"] for r in runs}, key=lambda g: (known.index(atari_game_key(g))
                                                                 if atari_game_key(g) in known else len(known), g))
        paths = []
        for train in trains:
            fig, axes = plt.subplots(1, len(games), figsize=(max(3.5 * len(games), 6), 3.4), squeeze=False)
            for ax, game in zip(axes[0], games):
                panel = [r for r in with_scratch(train) if r["task"] == game]
                if panel:
                    draw_panel(ax, panel, benchmark, game)
            axes[0][0].set_ylabel(CURVE_Y[benchmark])
            stem = "fig8" + (f"_{re.sub(r'[^A-Za-z0-9]+', '_', train)}" if train else "")
            title = f"Atari, pretrained on {train}" if train else "Atari, from scratch only"
            paths += save(fig, out, stem, formats, f"{title}: adaptation to each test game",
                          seeds_note(with_scratch(train)), legend_of(axes, benchmark))
        return paths
    tasks = sorted({r["task"] for r in runs})  # a benchmark this file does not know: a panel per task
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(3.5 * len(tasks), 6), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        draw_panel(ax, [r for r in runs if r["task"] == task], benchmark, task)
    axes[0][0].set_ylabel(runs[0]["metric"])
    return save(fig, out, f"curves_{benchmark}", formats, benchmark, seeds_note(runs), legend_of(axes, benchmark))


def _intervals(ax, y: int, low: float, high: float, point: float, color) -> None:
    """A 95% CI as a thick bar and the point estimate as a dot: visible even when the CI has no width."""
    ax.plot([low, high], [y, y], color=color, lw=7, alpha=0.45, solid_capstyle="butt")
    ax.plot([point], [y], "o", color=color, mec="black", ms=6)


def figure_aggregates(benchmark: str, summary: list[dict], poi: list[dict], out: str, formats) -> list[str]:
    """Median, IQM and mean of the final and the AUC scores with 95% CIs, and P(MT > X)."""
    plt = _matplotlib()
    entries = [(s["train_set"], s["method"]) for s in summary if s["score"] == "final"]
    rows = [s for s in ("final", "auc") if any(x["score"] == s for x in summary)]
    n_poi = max([sum(p["score"] == s for p in poi) for s in rows] + [1])
    fig, axes = plt.subplots(len(rows), 4, figsize=(16, (0.32 * max(len(entries), n_poi) + 1.1) * len(rows) + 0.6),
                             squeeze=False)
    labels = [f"{method_name(benchmark, m)} · {t}" if t else method_name(benchmark, m) for t, m in entries]
    for i, score in enumerate(rows):
        by_entry = {(s["train_set"], s["method"]): s for s in summary if s["score"] == score}
        for j, (stat, name) in enumerate((("median", "Median"), ("iqm", "IQM"), ("mean_pooled", "Mean"))):
            ax = axes[i][j]
            for y, key in enumerate(entries):
                s = by_entry.get(key)
                if s is not None:
                    lo, hi = {"median": s["median_ci"], "iqm": (s["iqm_low"], s["iqm_high"]),
                              "mean_pooled": s["mean_ci"]}[stat]
                    _intervals(ax, y, lo, hi, s[stat], COLORS.get(key[1], "#999999"))
            ax.set_yticks(range(len(entries)), labels if j == 0 else [""] * len(entries))
            ax.set_ylim(len(entries) - 0.5, -0.5)
            ax.set_title(f"{name}, {score} score")
            ax.set_xlabel(SCALE_NAME.get(benchmark, "score"))
            ax.grid(axis="x", alpha=0.3)
        ax, mine = axes[i][3], [p for p in poi if p["score"] == score]
        for y, p in enumerate(mine):
            _intervals(ax, y, p["low"], p["high"], p["p"], COLORS.get(p["other"], "#999999"))
        ax.set_yticks(range(len(mine)), [f"vs {method_name(benchmark, p['other'])} · {p['train_set']}" for p in mine])
        ax.yaxis.tick_right()
        ax.tick_params(axis="y", length=0, pad=10)
        ax.spines["right"].set_visible(True)  # P = 1 sits on this line, apart from the labels
        ax.set_ylim(max(len(mine), 1) - 0.5, -0.5)
        ax.axvline(0.5, color="gray", ls="--", lw=1)
        ax.set_xlim(-0.05, 1.05)
        ax.set_title(f"P(MT > X), {score} score" if mine else "P(MT > X): no MT runs to compare")
        ax.set_xlabel("probability of improvement")
        ax.grid(axis="x", alpha=0.3)
    return save(fig, out, f"aggregates_{benchmark}", formats, f"{benchmark}: aggregate scores over tasks and seeds",
                "Dot: point estimate; bar: 95% stratified bootstrap confidence interval (rliable).")


def figure_profiles(benchmark: str, per_task: dict, out: str, formats, reps: int, seed: int) -> list[str]:
    """Performance profiles of the final score: one panel per training set, its scratch baseline in each."""
    plt = _matplotlib()
    finals = {k[:2]: v for k, v in per_task.items() if k[2] == "final"}
    if not finals:
        return []
    pooled = np.concatenate([np.concatenate(list(v.values())) for v in finals.values()])
    lo, hi = float(pooled.min()), float(pooled.max())
    margin = 0.05 * (hi - lo or 1.0)
    taus = np.linspace(lo - margin, hi + margin, 101)
    trains = comparison_sets(finals)
    fig, axes = plt.subplots(1, len(trains), figsize=(max(4.5 * len(trains), 6), 3.6), squeeze=False, sharey=True)
    for ax, train in zip(axes[0], trains):
        base = (scratch_label(benchmark, train), "scratch")
        keys = [k for k in finals if k[0] == train] + ([base] if base in finals and base[0] != train else [])
        for key in sorted(keys, key=lambda k: method_order(k[1])):
            prof, ci = performance_profile(list(finals[key].values()), taus, reps, seed)
            color = COLORS.get(key[1])
            ax.plot(taus, prof, color=color, lw=1.8, label=method_name(benchmark, key[1]))
            ax.fill_between(taus, ci[0], ci[1], color=color, alpha=0.2, lw=0)
        ax.set_title(f"pretrained on {train}" if any(k[1] != "scratch" for k in keys) else train or "from scratch")
        ax.set_xlabel(f"final score τ ({SCALE_NAME.get(benchmark, 'score')})")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of runs with score > τ")
    return save(fig, out, f"profiles_{benchmark}", formats, f"{benchmark}: performance profiles of the final score",
                "Shaded: 95% stratified bootstrap confidence band (rliable).", legend_of(axes, benchmark))


# --------------------------------------------------------------------------- summary files


def write_summary(out: str, results: dict, missing: list[str], notes: list[str], reps: int) -> list[str]:
    csv_path, md_path = os.path.join(out, "summary.csv"), os.path.join(out, "summary.md")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SUMMARY_COLUMNS)
        for bench, (summary, _) in results.items():
            for s in summary:
                w.writerow([bench, s["train_set"], s["method"], s["score"], s["n_runs"]]
                           + ["" if math.isnan(s[k]) else f"{s[k]:.6g}"  # stderr of one seed: empty
                              for k in ("mean", "stderr", "iqm", "iqm_low", "iqm_high", "median")])
    fmt = lambda x: "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"
    lines = ["# Study summary", "",
             "Scores per run from its eval.csv: final = last evaluation, auc = mean over the evaluations, "
             "zero_shot = the evaluation at step 0; then pooled over held-out tasks and seeds. mean ± s.e.: "
             "per seed the mean over tasks, then mean and standard error over seeds. IQM and median: over all "
             f"runs, 95% stratified bootstrap CI ({reps} resamples, rliable).", ""]
    for bench, (summary, poi) in results.items():
        lines += [f"## {bench} ({SCALE_NAME.get(bench, 'score')})", ""]
        for score in SCORES:
            mine = [s for s in summary if s["score"] == score]
            if not mine:
                continue
            lines += [f"### {score}", "", "| training set | method | runs | mean ± s.e. | IQM [95% CI] | median |",
                      "|---|---|---:|---:|---:|---:|"]
            for s in mine:
                lines.append(f"| {s['train_set'] or '–'} | {method_name(bench, s['method'])} | {s['n_runs']} | "
                             f"{fmt(s['mean'])} ± {fmt(s['stderr'])} | {fmt(s['iqm'])} [{fmt(s['iqm_low'])}, "
                             f"{fmt(s['iqm_high'])}] | {fmt(s['median'])} |")
            lines.append("")
        if poi:
            lines += ["### Probability of improvement, P(MT > X)", "",
                      "| training set | score | X | P [95% CI] | tasks |", "|---|---|---|---:|---:|"]
            lines += [f"| {p['train_set']} | {p['score']} | {method_name(bench, p['other'])} | {fmt(p['p'])} "
                      f"[{fmt(p['low'])}, {fmt(p['high'])}] | {p['tasks']} |" for p in poi]
            lines.append("")
    lines += ["## Missing runs", ""] + ([f"- {m}" for m in missing] or ["none: the grid is complete"]) + [""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    with open(md_path, "w") as f:
        f.write("\n".join(lines))
    return [csv_path, md_path]


# --------------------------------------------------------------------------- main


def main(argv=None) -> str | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study-dir", required=True, help="the study directory (results.csv, runs/)")
    parser.add_argument("--out", default=None, help="output folder (default: STUDY_DIR/figures)")
    parser.add_argument("--format", nargs="+", default=["png", "pdf"], choices=["png", "pdf", "svg"])
    # 2000 resamples: rliable's default for performance profiles; enough for stable 95% CI ends.
    parser.add_argument("--reps", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    args = parser.parse_args(argv)
    if args.reps < 1:
        fail("--reps must be at least 1")
    runs, missing = load_study(args.study_dir)  # exits with one line on a bad study dir
    out = args.out or os.path.join(args.study_dir, "figures")
    os.makedirs(out, exist_ok=True)

    written, main_figures, results, notes = [], [], {}, []
    NOTES.clear()
    for bench in sorted({r["benchmark"] for r in runs}):
        mine = [r for r in runs if r["benchmark"] == bench]
        curves = figure_curves(bench, mine, out, args.format)
        main_figures.append(curves[0])  # fig4 / fig6 / the first fig8
        summary, poi, per_task, agg_notes = aggregate(mine, args.reps, args.seed)
        notes += agg_notes
        results[bench] = (summary, poi)
        written += curves
        if summary:
            written += figure_aggregates(bench, summary, poi, out, args.format)
            written += figure_profiles(bench, per_task, out, args.format, args.reps, args.seed)
    notes = NOTES + notes
    written += write_summary(out, results, missing, notes, args.reps)

    if not runs:
        print("figures.py: no finished run with evaluation rows yet; nothing to draw")
    if missing:
        print(f"missing: {len(missing)} run(s) not drawn (listed in {os.path.join(out, 'summary.md')}):")
        for m in missing[:20]:
            print(f"  {m}")
        if len(missing) > 20:
            print(f"  ... and {len(missing) - 20} more")
    for n in notes:
        print(f"note: {n}")
    main_figure = main_figures[0] if main_figures else None
    for p in written:
        if p != main_figure:
            print(p)
    if main_figure:
        print(main_figure)
    return main_figure


if __name__ == "__main__":
    main()
