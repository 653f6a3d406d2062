"""The committed studies under results/: figures.py regenerates their summaries from the committed files."""

import glob
import os

import pytest

import figures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDIES = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(ROOT, "results", "*", "results.csv")))


def test_there_is_a_committed_study():
    assert STUDIES, "results/ holds no study directory"


@pytest.mark.parametrize("study_dir", STUDIES, ids=os.path.basename)
def test_figures_regenerate_the_committed_summary(study_dir, tmp_path):
    out = tmp_path / "figures"
    figures.main(["--study-dir", study_dir, "--out", str(out), "--format", "png"])
    committed = os.path.join(study_dir, "figures")
    for name in ("summary.csv", "summary.md"):
        with open(os.path.join(committed, name)) as f, open(out / name) as g:
            assert g.read() == f.read(), f"{name} of {study_dir} differs from what figures.py makes of its files"
    committed_pngs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(committed, "*.png")))
    assert committed_pngs == sorted(os.path.basename(p) for p in glob.glob(str(out / "*.png")))
