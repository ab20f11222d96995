"""Reference curves in CI: rerun each stage's tiny reference run and compare its loss curve and key metrics with
tests/reference/<stage>.json, within a tolerance derived from seed noise (tests/reference/refcurves.py says how).
A change that alters the math fails here; if it was meant, `make update-reference` rewrites the references and
prints what moved."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REF = Path(__file__).resolve().parent / "reference"
sys.path.insert(0, str(REF))
import refcurves  # noqa: E402

UPDATE = "if the change is intended, run `make update-reference` and commit tests/reference/*.json"


def _ref(stage: str) -> dict:
    return json.loads((REF / f"{stage}.json").read_text())


@pytest.fixture(scope="module")
def rerun(tmp_path_factory) -> dict:
    return refcurves.run_chain(tmp_path_factory.mktemp("reference"), 0)


def test_references_were_built_from_the_pinned_files():
    now = refcurves.pinned_files()
    for stage in refcurves.STAGES:
        ref = _ref(stage)
        assert ref["pinned"] == now, f"{stage}: pinned data/configs changed since the reference was built; {UPDATE}"
        assert ref["seed_noise"]["seeds"] == [0, 1, 2] and ref["tolerance"]["loss"] >= refcurves.FLOOR
        assert len(ref["loss"]) >= 6 and ref["metrics"]


@pytest.mark.parametrize("stage", refcurves.STAGES)
def test_stage_matches_its_reference_curve(stage, rerun):
    problems = refcurves.compare(_ref(stage), rerun[stage])
    assert not problems, "\n".join(problems + [UPDATE])


def test_compare_reports_a_point_beyond_the_tolerance_only():
    ref = {"stage": "x", "loss": [[1, 0.70], [2, 0.60]], "metrics": {"acc": 0.5},
           "tolerance": {"loss": 0.01, "metrics": {"acc": 0.05}}}
    assert refcurves.compare(ref, {"loss": [[1, 0.705], [2, 0.595]], "metrics": {"acc": 0.54}}) == []
    got = refcurves.compare(ref, {"loss": [[1, 0.70], [2, 0.62]], "metrics": {"acc": 0.6}})
    assert len(got) == 2 and "loss at step 2 is 0.620000" in got[0] and "acc is 0.600000" in got[1]
    assert "logged at steps" in refcurves.compare(ref, {"loss": [[1, 0.7]], "metrics": {"acc": 0.5}})[0]
    # The tolerance is K times the across-seed spread: losses 1, 2, 3 at one step have std 1.
    tol = refcurves.tolerance([{"loss": [[1, v]], "metrics": {"m": v}} for v in (1.0, 2.0, 3.0)])
    assert tol["loss"] == pytest.approx(refcurves.K) and tol["metrics"]["m"] == pytest.approx(refcurves.K)
