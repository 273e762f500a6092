"""The k-comparison's published reference points, beside a study's own numbers."""

import pandas as pd
from rbm_study.analysis import kcompare


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
