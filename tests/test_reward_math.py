"""Reward-model losses and quality-gate metrics against hand-worked numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignment.reward import (bradley_terry_loss, centering_penalty, expected_calibration_error, gate_failures,
                              gate_metrics, mean_margin, mean_std, pairwise_accuracy, pearson, reward_loss,
                              soft_label_loss)

# -log σ(1) = log(1 + e^-1) = 0.3132617; -log σ(-1) = log(1 + e) = 1.3132617; -log σ(0.5) = 0.4740770
NLS_1, NLS_M1, NLS_HALF = 0.3132616875, 1.3132616875, 0.4740769842


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_bradley_terry_hand_numbers():
    # d = r_c - r_r = [1, -1] -> mean(0.3132617, 1.3132617)
    assert bradley_terry_loss(t(2.0, 0.0), t(1.0, 1.0)).item() == pytest.approx((NLS_1 + NLS_M1) / 2, abs=1e-9)


def test_bradley_terry_with_margin_hand_numbers():
    # d - m = [1 - 0.5, -1 - 0] = [0.5, -1] -> mean(0.4740770, 1.3132617) = 0.8936693
    loss = bradley_terry_loss(t(2.0, 0.0), t(1.0, 1.0), margin=t(0.5, 0.0))
    assert loss.item() == pytest.approx(0.8936693358, abs=1e-9)
    # A margin asks for a larger gap, so the same rewards cost more.
    assert loss.item() > bradley_terry_loss(t(2.0, 0.0), t(1.0, 1.0)).item()


def test_soft_label_loss_hand_numbers():
    # p = 0.8, d = 1: 0.8 * 0.3132617 + 0.2 * 1.3132617 = 0.5132617
    assert soft_label_loss(t(1.0), t(0.0), t(0.8)).item() == pytest.approx(0.5132616875, abs=1e-9)
    # p = 0.5, d = 0: -[0.5 log 0.5 + 0.5 log 0.5] = log 2
    assert soft_label_loss(t(3.0), t(3.0), t(0.5)).item() == pytest.approx(math.log(2), abs=1e-12)
    # p = 0.2 on d = -1 mirrors p = 0.8 on d = 1.
    assert soft_label_loss(t(0.0), t(1.0), t(0.2)).item() == pytest.approx(0.5132616875, abs=1e-9)


def test_soft_label_with_p_one_is_bradley_terry():
    rc, rr = t(0.3, -1.2, 2.0), t(0.1, 0.4, -0.5)
    assert soft_label_loss(rc, rr, t(1.0, 1.0, 1.0)).item() == pytest.approx(bradley_terry_loss(rc, rr).item())


def test_soft_label_loss_is_stable_for_large_gaps():
    loss = soft_label_loss(t(200.0), t(-200.0), t(0.9))
    # -(0.9 * log σ(400) + 0.1 * log σ(-400)) = 0.1 * 400 (plus ~e^-400)
    assert loss.item() == pytest.approx(40.0)


def test_soft_label_gradient_pushes_towards_p():
    # With p = 0.8, the loss is minimised at σ(d) = 0.8, i.e. d = log 4.
    d = torch.tensor([0.0], requires_grad=True)
    soft_label_loss(d, torch.zeros(1), t(0.8).float()).backward()
    assert d.grad.item() == pytest.approx(-(0.8 - 0.5))  # dL/dd = σ(d) - p
    d_opt = torch.tensor([math.log(4.0)], requires_grad=True)
    soft_label_loss(d_opt, torch.zeros(1), t(0.8).float()).backward()
    assert d_opt.grad.item() == pytest.approx(0.0, abs=1e-6)


def test_centering_and_dispatch():
    # (2 + 1)^2 = 9, (0 + 1)^2 = 1 -> mean 5 -> 0.01 * 5
    assert centering_penalty(t(2.0, 0.0), t(1.0, 1.0), 0.01).item() == pytest.approx(0.05)
    rc, rr = t(2.0, 0.0), t(1.0, 1.0)
    assert reward_loss(rc, rr).item() == pytest.approx((NLS_1 + NLS_M1) / 2)
    assert reward_loss(rc, rr, center_coef=0.01).item() == pytest.approx((NLS_1 + NLS_M1) / 2 + 0.05)
    assert reward_loss(rc, rr, margin=t(0.5, 0.0)).item() == pytest.approx(0.8936693358)
    # Soft labels win over a margin: the margin is ignored.
    soft = reward_loss(t(1.0), t(0.0), p_chosen=t(0.8), margin=t(5.0))
    assert soft.item() == pytest.approx(0.5132616875)


def test_accuracy_and_margin():
    rc, rr = [2.0, 0.0, 1.0, 3.0], [1.0, 1.0, 1.0, -1.0]
    assert pairwise_accuracy(rc, rr) == 0.5  # the tie (1.0 vs 1.0) counts as wrong
    assert mean_margin(rc, rr) == pytest.approx((1 - 1 + 0 + 4) / 4)


def test_ece_hand_numbers():
    # d = ln 3 -> σ = 0.75 (right); d = -ln 3 -> σ = 0.25, confidence 0.75 for "rejected" (wrong);
    # d = ln 19 -> σ = 0.95 (right, twice). 5 bins of width 0.1 over [0.5, 1]:
    #   bin [0.7, 0.8): conf 0.75, acc 0.5 -> |0.5 - 0.75| = 0.25, weight 2/4
    #   bin [0.9, 1.0]: conf 0.95, acc 1.0 -> 0.05, weight 2/4
    # ECE = 0.5 * 0.25 + 0.5 * 0.05 = 0.15
    rc = [math.log(3), -math.log(3), math.log(19), math.log(19)]
    rr = [0.0, 0.0, 0.0, 0.0]
    assert expected_calibration_error(rc, rr, n_bins=5) == pytest.approx(0.15)
    # One bin: |mean acc 0.75 - mean conf 0.85| = 0.10
    assert expected_calibration_error(rc, rr, n_bins=1) == pytest.approx(0.10)


def test_ece_of_a_perfectly_confident_correct_rm_is_zero():
    assert expected_calibration_error([100.0, 80.0], [0.0, 0.0]) == pytest.approx(0.0, abs=1e-12)
    # ... and of an equally confident wrong one is 1
    assert expected_calibration_error([0.0, 0.0], [100.0, 80.0]) == pytest.approx(1.0, abs=1e-12)


def test_pearson_hand_numbers():
    # x - 2.5 = [-1.5, -.5, .5, 1.5]; y - 5 = [-3, -1, 0, 4]; Sxy = 11, Sxx = 5, Syy = 26
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_gate_metrics_pool_chosen_and_rejected_for_length_corr():
    m = gate_metrics([3.0, 4.0], [1.0, 2.0], [30, 40], [10, 20])
    # rewards [3, 4, 1, 2] against lengths [30, 40, 10, 20]: exactly linear
    assert m["length_corr"] == pytest.approx(1.0)
    assert m["accuracy"] == 1.0 and m["mean_margin"] == pytest.approx(2.0)


def test_gate_failures_name_each_threshold():
    metrics = {"accuracy": 0.55, "length_corr": -0.7, "ece": 0.2, "mean_margin": 0.1}
    fails = gate_failures(metrics, min_accuracy=0.6, max_length_corr=0.5, max_ece=None)
    assert fails == ["accuracy 0.550 < min_accuracy 0.6", "|length_corr| 0.700 > max_length_corr 0.5"]
    assert gate_failures(metrics, min_accuracy=0.5, max_length_corr=0.8, max_ece=0.1) == ["ece 0.200 > max_ece 0.1"]
    assert gate_failures(metrics) == []


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, 1.0)


def test_metrics_by_group_hand_numbers():
    from alignment.reward import metrics_by_group

    groups = ["a", "b", "a", None]
    m = metrics_by_group(groups, [2.0, 0.0, 1.0, 9.0], [1.0, 1.0, 3.0, 0.0], [10, 5, 30, 1], [20, 5, 10, 1])
    assert list(m) == ["a", "b"]  # the ungrouped pair is left out
    # a: pairs (2 > 1) right, (1 > 3) wrong; margins 1 and -2; rewards [2, 1, 1, 3] vs lengths [10, 30, 20, 10]:
    # x - 1.75 = [.25, -.75, -.75, 1.25], y - 17.5 = [-7.5, 12.5, 2.5, -7.5]; Sxy = -22.5, Sxx = 2.75, Syy = 275,
    # sqrt(Sxx Syy) = 27.5: r = -9/11
    assert m["a"]["pairs"] == 2 and m["a"]["accuracy"] == 0.5 and m["a"]["mean_margin"] == -0.5
    assert m["a"]["length_corr"] == round(-9 / 11, 4)
    # b: one pair, chosen 0 < rejected 1: wrong; equal lengths: no correlation measurable
    assert m["b"] == {"pairs": 1, "accuracy": 0.0, "mean_margin": -1.0, "length_corr": 0.0}


def test_kind_gate_failures_floor_each_gated_kind():
    from alignment.reward import kind_gate_failures

    by_kind = {"bullets": {"pairs": 12, "accuracy": 0.75}, "keyword": {"pairs": 13, "accuracy": 0.8462},
               "title": {"pairs": 3, "accuracy": 0.0}, "uppercase": {"pairs": 40, "accuracy": 0.1}}
    fails, skipped = kind_gate_failures(by_kind, min_accuracy=0.8, min_pairs=5, gated={"bullets", "keyword", "title"},
                                        set_name="heldout_phrasings")
    # 9/12 = 0.75 misses 0.8; 11/13 meets it; 3 pairs are too few to gate; uppercase was never trained on
    assert fails == ["heldout_phrasings kind 'bullets' accuracy 0.750 < min_kind_accuracy 0.8 (12 pairs)"]
    assert skipped == {"title": "3 pairs < min_kind_pairs 5", "uppercase": "not a kind the RM trained on"}
    # no list of trained kinds: every kind with enough pairs is gated
    fails, skipped = kind_gate_failures(by_kind, min_accuracy=0.8, min_pairs=3)
    assert [f.split("'")[1] for f in fails] == ["bullets", "title", "uppercase"] and skipped == {}
    assert kind_gate_failures(by_kind, min_accuracy=None) == ([], {})


def _rm_kinds():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_rm_kinds", Path(__file__).resolve().parent.parent / "bench" / "rm_kinds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _metrics(by_kind: dict, accuracy: float, ci=None, corr=None, set_name="heldout_phrasings") -> dict:
    return {f"{set_name}_by_category": {k: {"accuracy": a, "pairs": n, "mean_margin": 0.0} for k, (a, n) in
                                        by_kind.items()},
            f"{set_name}_accuracy": accuracy, f"{set_name}_accuracy_ci": ci, f"{set_name}_length_corr": corr}


def test_rm_kinds_tables_each_run_per_kind_and_counts_the_kinds_at_the_floor(tmp_path, capsys):
    """bench/rm_kinds.py: kinds x runs; a kind below the floor in bold; 10/12 = 0.833 passes 0.8 and 9/12 = 0.75
    does not; a kind one run lacks is '-'; a run's count is over its own kinds."""
    rk = _rm_kinds()
    a, b = tmp_path / "a", tmp_path / "b.json"
    a.mkdir()
    (a / "metrics.json").write_text(json.dumps(_metrics({"keyword": (10 / 12, 12), "title": (0.75, 12)}, 0.7917,
                                                        ci=[0.625, 0.958], corr=0.123)))
    b.write_text(json.dumps(_metrics({"keyword": (1.0, 12), "title": (0.8, 10), "bullets": (0.5, 2)}, 0.8333)))
    assert rk.main([f"s0={a}", f"s1={b}", "--json", str(tmp_path / "out.json")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "| kind | s0 | s1 |", "|---|---:|---:|",
        "| bullets | - | **0.50** (2) |",
        "| keyword | 0.83 (12) | 1.00 (12) |",
        "| title | **0.75** (12) | 0.80 (10) |",
        "| all kinds | 0.792 [0.625, 0.958] | 0.833 |",
        "| kinds >= 0.8 | 1 of 2 | 2 of 3 |",
        "| length corr | +0.12 | - |"]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["s0"]["kinds_at_floor"] == 1 and out["s1"]["kinds"]["title"] == [0.8, 10]


@pytest.mark.parametrize("spec, message", [
    ("nope", "'nope': expected NAME=PATH"),
    ("x={missing}", "not a readable metrics.json (FileNotFoundError)"),
    ("x={other_set}", "no per-kind figures for set 'heldout_phrasings' (heldout_phrasings_by_category)"),
])
def test_rm_kinds_refuses_bad_input_in_one_line(tmp_path, capsys, spec, message):
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_metrics({"keyword": (1.0, 12)}, 1.0, set_name="eval")))
    assert _rm_kinds().main([spec.format(missing=tmp_path / "none", other_set=other)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("rm_kinds: error: ") and message in err, err
