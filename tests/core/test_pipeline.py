"""The core on real MNIST: training helps, AIS agrees with enumeration, the lab run is reproducible."""

import pytest
import torch

from rbm_study.core import evaluate
from rbm_study.core.config import load_config
from rbm_study.core.data import binarize_once, load_mnist
from rbm_study.core.models import RBM, visible_bias_from_means
from rbm_study.core.pipeline import LabCheckpoint, run_lab
from rbm_study.core.train import CDSettings, train_rbm
from tests.conftest import TINY

# RAISE kept cheap here (its validated defaults cost minutes: tests/core/test_raise.py)
CHEAP_RAISE = ["eval.raise_images=10", "eval.raise_chains=2", "eval.raise_betas=100"]


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return load_mnist(mnist_dir, subset=3000)


def small_rbm(mnist, hidden: int, epochs: int, seed: int = 0) -> tuple[RBM, RBM]:
    g = torch.Generator().manual_seed(seed)
    initial = RBM.init(784, hidden, generator=g, visible_bias=visible_bias_from_means(mnist.train.mean(0)))
    trained = train_rbm(initial.clone(), mnist.train, CDSettings(cd_k=1, learning_rate=0.1, epochs=epochs), g)
    return initial, trained


def test_training_improves_validation_log_likelihood(mnist):
    initial, trained = small_rbm(mnist, hidden=16, epochs=4)
    val = binarize_once(mnist.val[:1000])
    ll = [evaluate.mean_log_likelihood(m, val, evaluate.exact_log_z(m)) for m in (initial, trained)]
    assert ll[1] > ll[0] + 5, ll  # nats per image: the base-rate model is about -206 on MNIST


@pytest.mark.slow
def test_ais_agrees_with_enumeration_on_an_mnist_rbm(mnist):
    _, rbm = small_rbm(mnist, hidden=18, epochs=3)
    exact = evaluate.exact_log_z(rbm)
    est = evaluate.ais_log_z(rbm, visible_bias_from_means(mnist.train.mean(0)), chains=100, betas=14_500,
                             generator=torch.Generator().manual_seed(0))
    assert abs(est.log_z - exact) < 0.5, (est, exact)
    assert est.low <= exact + 0.5 and est.high >= exact - 0.5


def test_lab_run_is_reproducible_and_complete(mnist):
    config = load_config("configs/lab.yaml", [*TINY, *CHEAP_RAISE, "device=cpu"])
    seen = []
    one = run_lab(config, on_epoch=lambda stage, epoch, m: seen.append((stage, epoch)), data=mnist)
    two = run_lab(config, data=mnist)
    assert seen == [("rbm", 1), ("rbm", 2), ("dbn", 1), ("finetune", 1)]
    assert torch.equal(one.rbm.W, two.rbm.W) and torch.equal(one.finetuned.R, two.finetuned.R)
    for stage in ("rbm", "dbn", "finetune"):
        for split in ("val", "test"):
            assert one.metrics[f"{stage}.{split}.log_likelihood"] < 0
            assert one.metrics[f"{stage}.{split}.recon_error"] > 0
        assert one.metrics[f"{stage}.seconds_per_epoch"] > 0
    assert one.metrics["rbm.log_z_exact"] == 1.0  # 16 hidden units: enumerated, not estimated
    assert one.metrics["final.test.log_likelihood"] == one.metrics["finetune.test.log_likelihood"]
    assert set(one.weight_files()) == {"zad1_rbm.th", "zad2_dbn.th", "zad3_dbn_ft.th"}


def test_finetune_zero_epochs_skips_task_three(mnist):
    config = load_config("configs/lab.yaml", [*TINY, *CHEAP_RAISE, "finetune.epochs=0", "device=cpu"])
    result = run_lab(config, data=mnist)
    assert result.finetuned is None and "zad3_dbn_ft.th" not in result.weight_files()
    assert result.metrics["final.val.log_likelihood"] == result.metrics["dbn.val.log_likelihood"]


def test_resuming_from_a_stage_checkpoint_gives_the_same_run(mnist):
    config = load_config("configs/lab.yaml", [*TINY, *CHEAP_RAISE, "device=cpu"])
    checkpoints = []
    whole = run_lab(config, data=mnist, on_checkpoint=lambda c: checkpoints.append(c.to_bytes()))
    assert [LabCheckpoint.from_bytes(c).stage for c in checkpoints] == ["rbm", "dbn"]
    for data in checkpoints:
        seen = []
        resumed = run_lab(config, data=mnist, resume_from=LabCheckpoint.from_bytes(data),
                          on_epoch=lambda stage, epoch, m, seen=seen: seen.append(stage))
        assert "rbm" not in seen  # task 1 was not trained again
        assert torch.equal(resumed.finetuned.G, whole.finetuned.G)
        assert torch.equal(resumed.dbn.top.W, whole.dbn.top.W)
        def measured(metrics: dict) -> dict:  # all but the timings
            return {k: v for k, v in metrics.items() if "seconds" not in k}

        assert measured(resumed.metrics) == measured(whole.metrics)


def test_exploded_weights_are_reported_as_divergence(mnist):
    """Huge learning rates leave finite but absurd weights (sigmoids saturate): AIS gives a NaN log Z."""
    config = load_config("configs/lab.yaml", [*TINY, *CHEAP_RAISE, "device=cpu", "rbm.learning_rate=1e38",
                                              "rbm.hidden_size=30"])
    with pytest.raises(FloatingPointError, match="diverged"):
        run_lab(config, data=mnist)


def test_every_log_likelihood_comes_with_its_uncertainty_and_the_estimators_seconds(mnist):
    """The metric names the report reads (core.pipeline's docstring), with values that make sense."""
    config = load_config("configs/lab.yaml", [*TINY, *CHEAP_RAISE, "device=cpu", "rbm.hidden_size=24",
                                              "eval.ais_repeats=3", "eval.curve_every=1", "eval.curve_images=50",
                                              "eval.curve_chains=4", "eval.curve_betas=50"])
    epochs = []
    result = run_lab(config, data=mnist, on_epoch=lambda stage, epoch, m: epochs.append((stage, epoch, m)))
    m = result.metrics
    for stage in ("rbm", "dbn", "finetune"):
        for split in ("val", "test"):
            ll = f"{stage}.{split}.log_likelihood"
            assert m[f"{ll}_low"] <= m[ll] <= m[f"{ll}_high"]
            assert m[f"{ll}_low"] == pytest.approx(m[ll] - (m[f"{stage}.log_z_high"] - m[f"{stage}.log_z"]))
            assert 0 < m[f"{ll}_stderr"] < 5  # 300 images, per-image spread of ~30 nats
        raised = f"{stage}.test.log_likelihood_raise"
        assert -400 < m[raised] < 0 and m[f"{raised}_stderr"] > 0
        assert abs(m[f"{raised}_gap"]) < 20 and m[f"{raised}_gap_stderr"] >= 0
        for timing in ("ais_seconds", "raise_seconds", "curve_seconds"):
            assert m[f"{stage}.{timing}"] > 0
        # all the stage's measuring: the estimators, and the scores, bounds and per-epoch signals beside them
        estimators = sum(m[f"{stage}.{timing}"] for timing in ("ais_seconds", "raise_seconds", "curve_seconds"))
        assert estimators < m[f"{stage}.eval_seconds"] < result.seconds
    assert m["rbm.log_z_exact"] == 0.0 and m["rbm.log_z_sd"] > 0  # 24 hidden units: AIS, three runs
    assert m["dbn.log_z_exact"] == 1.0 and m["dbn.log_z_sd"] == 0.0
    expected = {"eval.ais_repeats": 3, "eval.raise_images": 10, "eval.raise_chains": 2, "eval.raise_betas": 100,
                "eval.curve_every": 1}
    assert {k: m[k] for k in expected} == expected
    curve = [(stage, epoch, values["val_log_likelihood"]) for stage, epoch, values in epochs]
    assert [(stage, epoch) for stage, epoch, _ in curve] == [("rbm", 1), ("rbm", 2), ("dbn", 1), ("finetune", 1)]
    assert all(-400 < value < 0 for *_, value in curve)
    assert all(values["curve_seconds"] > 0 for *_, values in epochs)


def test_evaluation_settings_leave_the_trained_models_alone(mnist):
    """AIS, RAISE and the curves draw from generators of their own; the stage lists pick what they measure."""
    plain = run_lab(load_config("configs/lab.yaml", [*TINY, *CHEAP_RAISE, "device=cpu", "eval.raise_images=0"]),
                    data=mnist)
    curves: list[str] = []  # the stage of each curve point

    def record_curve(stage: str, epoch: int, values: dict[str, float]) -> None:
        if "val_log_likelihood" in values:
            curves.append(stage)

    measured = run_lab(load_config("configs/lab.yaml", [*TINY, *CHEAP_RAISE, "device=cpu", "eval.curve_every=1",
                                                        "eval.ais_repeats=2", "eval.curve_images=20",
                                                        "eval.curve_betas=20", "eval.ais_chains=5",
                                                        "eval.raise_stages=[rbm, finetune]",
                                                        "eval.curve_stages=[rbm, dbn]"]),
                       data=mnist, on_epoch=record_curve)
    assert torch.equal(plain.finetuned.R, measured.finetuned.R) and torch.equal(plain.dbn.top.W, measured.dbn.top.W)
    assert "rbm.test.log_likelihood_raise" not in plain.metrics and "rbm.raise_seconds" not in plain.metrics
    # RAISE on the stages asked for only: the greedy DBN keeps AIS's side alone
    assert {f"{s}.test.log_likelihood_raise" in measured.metrics for s in ("rbm", "finetune")} == {True}
    assert "dbn.test.log_likelihood_raise" not in measured.metrics and "dbn.raise_seconds" not in measured.metrics
    assert plain.metrics["rbm.curve_seconds"] == 0.0
    # curves on the stages asked for only, one point an epoch
    assert curves == ["rbm"] * 2 + ["dbn"] and measured.metrics["finetune.curve_seconds"] == 0.0
