"""The k-comparison's wording rules, on constructed study databases (numbers set, nothing trained).

Each test writes a study with `builddb.constructed_run` through the study service's own storage,
reads it back the way the report does, and checks what the k-comparison section says.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest

from rbm_study.analysis import kcompare, overview, report
from rbm_study.analysis.html import Document, to_markdown
from rbm_study.analysis.load import open_snapshot
from tests.analysis import builddb
from tests.analysis.builddb import constructed_run

NO_DIFF = kcompare.NO_DIFFERENCE
SEEDS = (0, 1, 2)
NOISE = (0.0, 0.6, -0.5)  # a seed's offset from its k's value


def _section(tmp_path: Path, runs: list[dict], sampler: str = "grid") -> str:
    """The k-comparison section of a constructed study, as report.md would hold it."""
    db = tmp_path / "study.db"
    builddb.write_study(db, "constructed", runs, sampler=sampler)
    out = tmp_path / "out"
    out.mkdir()
    doc = Document("k")
    with open_snapshot(db) as snap:
        table = overview.trials_table(snap.trials, snap.final_metrics)
        done = table[table["state"] == "completed"].assign(k=lambda d: d["k"].astype(int))
        configs = dict(zip(snap.trials["id"], snap.trials["config"], strict=True))
        kcompare.write_section(doc, done, snap.epoch_metrics, out, configs=configs, sampler=sampler)
    return to_markdown(doc)


def _grid(rbm: dict[int, float], dbn: dict[int, float] | None = None, **kwargs) -> list[dict]:
    """k x SEEDS; each seed off its k's value by NOISE (the same for every model)."""
    return [constructed_run(k, seed, value + noise, None if dbn is None else dbn[k] + noise / 2,
                            None if dbn is None else dbn[k] + 2.5 + noise / 2, **kwargs)
            for k, value in rbm.items() for seed, noise in zip(SEEDS, NOISE, strict=True)]


def _claims(text: str) -> list[str]:
    """Phrases that claim something about k."""
    found = re.findall(r"highest (?:mean )?at k=\d+|lowest (?:mean )?at k=\d+|rises with k|falls with k|"
                       r"second layer erases|carries through the second layer|likelihood disagree", text)
    return found


# --- the wording rules ------------------------------------------------------------------------------
def test_overlapping_intervals_give_no_claim(tmp_path: Path):
    # k moves the RBM by 0.8 nats; AIS's intervals are +-2 nats: nothing separates
    text = _section(tmp_path, _grid({1: -110.0, 3: -109.6, 10: -109.2}, {1: -102.0, 3: -102.1, 10: -102.0},
                                    halfwidth=2.0))
    assert f"{NO_DIFF} between any two of k = 1, 3, 10" in text
    assert "For none of the three models is a difference between values of k measured at this size" in text
    assert "no trend is claimed" in text or "no monotone trend" in text
    assert _claims(text) == []


def test_separated_intervals_give_the_named_k_and_the_link_between_models(tmp_path: Path):
    text = _section(tmp_path, _grid({1: -130.0, 3: -115.0, 10: -100.0}, {1: -102.0, 3: -102.4, 10: -102.2}))
    assert "highest at k=10 (" in text and "separated from every other k" in text
    assert "it rises with k (Spearman ρ = " in text and "bootstrap interval over 3 seeds" in text
    # what connects the models leads: k's 30 nats on the RBM against nothing on the DBN bounds
    lead = next(line for line in text.splitlines() if line.startswith("Across k"))
    assert "the RBM's test log-likelihood by 30.00 nats" in lead and "intervals separate" in lead
    assert f"the greedy DBN's test bound by 0.40 nats (-102.38 at k=3, -101.98 at k=1; {NO_DIFF})" in lead
    assert "The second layer erases k's effect" in lead
    assert text.index("Across k") < text.index("| k |")  # sentences first, then the table


def test_indistinguishable_best_values_are_not_ranked(tmp_path: Path):
    """The issue's k=10 against k=25: 0.2 nats apart, intervals overlapping."""
    text = _section(tmp_path, _grid({1: -138.4, 2: -120.0, 10: -103.2, 25: -103.0}))
    assert "highest mean at k=25" in text
    assert f"but k=10 is within its interval ({NO_DIFF}); k=1, 2 are lower" in text
    assert "highest at k=25" not in text and "best k" not in text


def test_the_trend_is_judged_across_all_k_not_the_two_ends(tmp_path: Path):
    # the ends differ (k=10 above k=1), the middle does not follow: no trend may be claimed
    text = _section(tmp_path, _grid({1: -112.0, 2: -100.0, 3: -120.0, 5: -100.0, 10: -108.0}))
    assert "rises with k" not in text and "falls with k" not in text
    assert "no trend is claimed" in text or "no monotone trend" in text
    # a monotone rise is claimed over all k
    monotone = _section(tmp_path / "m", _grid({1: -120.0, 2: -115.0, 3: -110.0, 5: -105.0, 10: -100.0}))
    assert "it rises with k" in monotone


def test_a_confounded_tpe_study_gives_the_caveat_and_no_k_claim(tmp_path: Path):
    """k varies together with the hidden size and the learning rate, never at the same setting."""
    runs = []
    for i, (k, seed) in enumerate((k, s) for k in (1, 3, 10) for s in SEEDS):
        params = {"rbm.hidden_size": 50 + 25 * i, "rbm.learning_rate": round(0.02 + 0.01 * i, 3)}
        runs.append(constructed_run(k, seed, -130.0 + 3 * k, -102.0, -99.0, params=params))
    text = _section(tmp_path, runs, sampler="tpe")
    assert "(search sampler: tpe): rbm.hidden_size, rbm.learning_rate" in text
    assert "cannot separate k's effect from theirs" in text and "no claim about k is made" in text
    assert _claims(text) == []
    assert "| k |" in text  # the trials are still described


def test_k_is_compared_within_matched_settings(tmp_path: Path):
    runs = _grid({1: -130.0, 10: -100.0}, params={"rbm.hidden_size": 100})
    runs += [constructed_run(1, seed, -90.0, params={"rbm.hidden_size": 50}) for seed in SEEDS]  # k=1 only
    text = _section(tmp_path, runs)
    assert "k is compared only among trials with matched settings: the 6 at rbm.hidden_size=100; 3 other" in text
    assert "highest at k=10" in text  # the 50-unit trials (k=1 at -90) are left out


def test_seeds_are_counted_as_seeds_not_trials(tmp_path: Path):
    """Three trials per k, all with seed 0 (the quick study's mistake): one seed, no interval, no claim."""
    runs = [constructed_run(k, 0, value + noise) for k, value in {1: -133.0, 3: -125.0}.items() for noise in NOISE]
    text = _section(tmp_path, runs)
    assert "k=1: 3 trials, 1 distinct seed; k=3: 3 trials, 1 distinct seed" in text
    assert "| 1 | 1 (3 trials) |" in text
    assert "(one seed, no interval)" in text
    assert f"{NO_DIFF}: with one seed per k there is no interval" in text
    assert _claims(text) == []


def test_a_stalled_trial_is_named_and_left_out_of_the_median(tmp_path: Path):
    seconds = {1: (1.0, 1.2, 9.0), 3: (2.0, 2.1, 2.2)}
    runs = [constructed_run(k, seed, -110.0 - k, seconds=seconds[k][i])
            for k in (1, 3) for i, seed in enumerate(SEEDS)]
    text = _section(tmp_path, runs)
    assert re.search(r"Trial \d+ \(k=1, seed 2\) took 9\.00 s per epoch, 8\.2 times the median of the other "
                     r"trials at its k \(1\.10 s\): a stalled trial, left out", text)
    assert "| 1.10 (1.00-1.20), 1 stalled left out |" in text  # median of 1.0 and 1.2; 9.0 not in the range
    assert "an RBM epoch took a median of 1.10 s at k=1 and 2.10 s at k=3 (1.91 times as long)" in text
    assert "| 9.00 (stalled) |" in text


def test_missing_raise_and_older_metrics_are_said_plainly(tmp_path: Path):
    text = _section(tmp_path, _grid({1: -120.0, 3: -110.0}, {1: -102.0, 3: -102.0}, raise_gap=None))
    assert "RAISE, the estimate from the other direction, is missing for any trial" in text
    assert "For the DBN bounds only AIS's side exists" in text
    assert "| not recorded | n/a |" in text  # RAISE and the gap columns

    # an older database: no AIS intervals, standard errors, RAISE or settings among the metrics
    old = _grid({1: -120.0, 3: -110.0}, {1: -102.0, 3: -102.0},
                drop=("_low", "_high", "_stderr", "_raise", "_raise_gap", "eval.ais_chains", "eval.ais_betas",
                      "eval.ais_repeats"))
    text = _section(tmp_path / "old", old)
    assert "AIS intervals (log Z interval) are not recorded for the RBM, greedy DBN, fine-tuned DBN" in text
    assert "Test-set standard errors are not recorded" in text
    assert "AIS with 16 chains x 200 inverse temperatures" in text  # from the trials' configs (builddb.TINY)


def test_with_raise_both_estimates_their_gap_and_the_settings_are_reported(tmp_path: Path):
    text = _section(tmp_path, _grid({1: -120.0, 3: -110.0}, {1: -102.0, 3: -102.0}, raise_gap=0.8))
    assert ("AIS and RAISE disagree by a median of 0.80 nats per trial for the RBM (AIS minus RAISE from 0.80 to "
            "0.80, AIS above RAISE) (measured image by image on the images RAISE scored)") in text
    assert "For the DBN bounds only AIS's side exists" in text
    assert ("AIS with 100 chains x 14,500 inverse temperatures, 3 repeats (RBM log Z spread between repeats: "
            "median sd 0.050 nats); RAISE with 10 chains per image x 1,000 inverse temperatures on the first "
            "1,000 test images") in text
    assert "| -119.97 [" in text and "| -120.77 [" in text  # k=1: AIS and RAISE, means over seeds
    assert "| 0.80 |" in text  # their gap per k
    trials_csv = pd.read_csv(tmp_path / "out" / "k_trials.csv")
    assert len(trials_csv) == 6 and set(trials_csv["AIS - RAISE"]) == {0.8}


def test_raise_for_the_dbn_bounds_and_an_unpaired_gap(tmp_path: Path):
    text = _section(tmp_path, _grid({1: -120.0, 3: -110.0}, {1: -102.0, 3: -102.0}, dbn_raise_gap=1.5))
    assert "only AIS's side exists" not in text
    assert "by a median of 1.50 nats per trial for the greedy DBN" in text
    # RAISE's side widens the DBN bound's interval: 1.5 nats below AIS's, and 2 standard errors more
    long = pd.read_csv(tmp_path / "out" / "k_comparison.csv").set_index(["metric", "k"])
    low = long.loc[("dbn.test.log_likelihood", 1)]
    assert low["mean"] - low["low"] > 1.5 + 2 * 0.3
    # a database without the paired gap: AIS on all images against RAISE on its own
    unpaired = _section(tmp_path / "u", _grid({1: -120.0, 3: -110.0}, drop=("_raise_gap", "_raise_gap_stderr")))
    assert "so the images' difference is in it too" in unpaired


def test_unbounded_ais_intervals(tmp_path: Path):
    """An interval unbounded on the side facing away from the other k keeps them apart. An upper end
    of +inf (AIS's 3 sigma before Markov's floor, in databases written then) is read as the floor
    puts it, ln 20 above the estimate: then k=1 at -130 still separates from k=10 at -100, while
    6 nats apart they overlap."""
    below = _grid({1: -130.0, 10: -100.0})
    below[0]["metrics"]["rbm.test.log_likelihood_low"] = -math.inf
    text = _section(tmp_path, below)
    assert "highest at k=10" in text and "[-inf, " in text
    above = _grid({1: -130.0, 10: -100.0})
    above[0]["metrics"]["rbm.test.log_likelihood_high"] = math.inf
    text = _section(tmp_path / "above", above)
    assert "highest at k=10" in text and ", inf]" not in text
    high = pd.read_csv(tmp_path / "above" / "out" / "k_comparison.csv").set_index(["metric", "k"])
    row = high.loc[("rbm.test.log_likelihood", 1)]
    assert math.isfinite(row["high"])
    close = _grid({1: -106.0, 10: -100.0})
    close[0]["metrics"]["rbm.test.log_likelihood_high"] = math.inf
    assert f"{NO_DIFF} between any two of k = 1, 10" in _section(tmp_path / "close", close)


def test_reconstruction_error_and_likelihood_disagreeing_is_stated_with_numbers(tmp_path: Path):
    text = _section(tmp_path, _grid({1: -130.0, 3: -115.0}, recon=23.7))
    assert (f"Reconstruction error and likelihood disagree: the test reconstruction error is 23.70 across k "
            f"({NO_DIFF}) while the RBM's test log-likelihood moves by 15.00 nats") in text


def test_likelihood_curves_are_drawn_and_read(tmp_path: Path):
    falling = [-125.0, -121.5, -124.0, -129.0, -134.0, -138.0]  # CD-1 losing likelihood as it trains
    runs = [constructed_run(1, s, -138.0 + n, curve=[v + n for v in falling])
            for s, n in zip(SEEDS, NOISE, strict=True)]
    runs += [constructed_run(10, s, -103.0 + n, curve=[-125.0 + 4 * i + n for i in range(6)])
             for s, n in zip(SEEDS, NOISE, strict=True)]
    text = _section(tmp_path, runs)
    assert "at k=1 it peaks at epoch 10 (-121.47) and ends 16.50 nats lower at epoch 30" in text
    assert "no fall after the peak is measured at k=10" in text
    assert ("likelihood curves every 5 epochs (AIS with 32 chains x 2,000 inverse temperatures on the first 1,000 "
            "validation images)") in text
    assert (tmp_path / "out" / "k_likelihood_curves.png").is_file()
    flat = _section(tmp_path / "flat", _grid({1: -120.0, 3: -110.0}))
    assert "no likelihood curves recorded" in flat


def test_published_numbers_only_beside_ours_at_their_size(tmp_path: Path):
    text = _section(tmp_path, _grid({1: -128.0, 3: -110.0}, params={"rbm.hidden_size": 500}))
    assert "| published, 500 hidden (S&M 2008) |" in text and "| -125.5 |" in text
    assert "published, 500 hidden" not in _section(tmp_path / "small", _grid({1: -128.0, 3: -110.0}))


def test_the_report_places_the_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """report.build reads the sampler from the study config and the numbers from the database."""
    monkeypatch.delenv("MNIST_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    runs = []
    for i, (k, seed) in enumerate((k, s) for k in (1, 3) for s in SEEDS):
        runs.append(constructed_run(k, seed, -120.0 + k, params={"rbm.learning_rate": 0.01 * (i + 1)}))
    db = tmp_path / "tpe.db"
    builddb.write_study(db, "tpe", runs, sampler="tpe")
    report.build(db, tmp_path / "r")
    text = (tmp_path / "r" / "report.md").read_text()
    assert "(search sampler: tpe): rbm.learning_rate" in text and "no claim about k is made" in text
    for name in ("k_metrics.png", "k_comparison.csv", "k_trials.csv"):
        assert (tmp_path / "r" / name).is_file(), name


# --- pieces -----------------------------------------------------------------------------------------
def test_rank_trend_resamples_seeds():
    cells = pd.DataFrame({"k": [1, 2, 3] * 3, "seed": [0] * 3 + [1] * 3 + [2] * 3,
                          "value": [1.0, 2.0, 3.0, 1.5, 2.5, 3.5, 0.5, 1.8, 2.9]})
    rho, low, high, seeds = kcompare.rank_trend(cells)
    assert seeds == 3 and low <= rho <= high and low > 0
    rho, low, high, seeds = kcompare.rank_trend(cells[cells["seed"] == 0])
    assert rho == pytest.approx(1.0) and math.isnan(low) and seeds == 1


def _trials(hidden: list[int], k: list[int], ll: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"hidden": hidden, "k": k, "rbm.test.log_likelihood": ll})


def test_published_numbers_sit_beside_the_studys_own_at_the_published_size():
    trials = _trials([500, 500, 500, 100], [1, 1, 3, 1], [-121.0, -123.0, -110.0, -140.0])
    text = kcompare.answer_published(trials)
    low, high = kcompare.t_interval(pd.Series([-121.0, -123.0]))
    assert "-125.5 for CD-1, -105.5 for CD-3, -86.3 for CD-25" in text
    assert f"k=1: -122.00 [{kcompare.fmt(low)}, {kcompare.fmt(high)}] (2 trials; published -125.5)" in text
    assert "k=3: -110.00 (1 trial; published -105.5)" in text
    assert "-140" not in text  # the 100-unit trial is not of the published size


def test_other_sizes_are_compared_by_direction_not_level():
    text = kcompare.answer_published(_trials([100, 200], [1, 2], [-130.0, -125.0]))
    assert "have 100, 200 hidden units" in text and "not its level" in text
    assert "published -" not in text


def test_no_log_likelihoods_no_paragraph():
    assert kcompare.answer_published(pd.DataFrame({"hidden": [500], "k": [1]})) is None


def test_curves_of_some_stages_and_all_the_evaluation_seconds_are_said(tmp_path: Path):
    stages = {"rbm.eval_seconds": 110.0, "dbn.eval_seconds": 100.0, "finetune.eval_seconds": 90.0}
    runs = [constructed_run(1, s, -130.0 + n, curve=[-125.0 + n] * 3, extra=stages)
            for s, n in zip(SEEDS, NOISE, strict=True)]
    for run in runs:
        run["config"]["eval"]["curve_stages"] = ["rbm"]
    text = _section(tmp_path, runs)
    assert "likelihood curves every 5 epochs of the RBM only (AIS with 32 chains" in text
    # the RBM's AIS, RAISE and curve seconds, and the rest of the 300 s the three stages spent measuring
    assert ("Evaluation per trial (median; each over all three models): AIS 60.0 s, RAISE 30.0 s, curves 3.0 s, "
            "the rest (scores, bounds, per-epoch signals) 207.0 s.") in text
