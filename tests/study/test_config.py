"""A study's stored config as a later release reads it (`study.config.stored_config`)."""

from __future__ import annotations

from rbm_study.study.config import load_study_config, stored_config


def test_a_config_stored_before_raise_keeps_raise_off_and_a_newer_one_keeps_its_setting():
    config = load_study_config(None, ["eval.raise_images=20"]).to_dict()
    assert stored_config(config).eval.raise_images == 20
    del config["eval"]["raise_images"]  # as a study launched before RAISE existed stored it
    assert stored_config(config).eval.raise_images == 0
    assert stored_config(config).eval.raise_betas == load_study_config(None).eval.raise_betas
