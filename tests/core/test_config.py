import pytest

from rbm_study.core.config import ConfigError, LabConfig, keys, load_config, parse_override


def test_defaults_are_the_lab_settings(tmp_path):
    config = load_config(None)
    assert config.to_dict()["rbm"] == {
        "hidden_size": 100, "cd_k": 1, "persistent": False, "learning_rate": 0.1, "epochs": 100,
        "batch_size": 100, "momentum": 0.0, "weight_decay": 0.0,
    }
    assert config.finetune.cd_k == 2 and config.finetune.learning_rate == 0.01


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rbm:\n  cd_k: 3\n  learning_rate: 0.05\n")
    config = load_config(path, ["rbm.cd_k=5", "rbm.persistent=true", "data.subset=null"])
    assert config.rbm.cd_k == 5 and config.rbm.learning_rate == 0.05
    assert config.rbm.persistent is True and config.data.subset is None


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("rbm.cd_k=0", "rbm.cd_k"),
        ("rbm.hidden_size=0", "rbm.hidden_size"),
        ("dbn.hidden_size=-3", "dbn.hidden_size"),
        ("rbm.learning_rate=0", "rbm.learning_rate"),
        ("finetune.learning_rate=-0.1", "finetune.learning_rate"),
        ("rbm.epochs=-1", "rbm.epochs"),
        ("rbm.cd_k=two", "rbm.cd_k"),
        ("rbm.momentum=1.5", "rbm.momentum"),
        ("rbm.persistent=maybe", "rbm.persistent"),
        ("rbm.cdk=2", "rbm.cdk"),
        ("eval.raise_stages=[rbm, top]", "eval.raise_stages"),
        ("eval.raise_stages=rbm", "eval.raise_stages"),
        ("eval.curve_stages=[rbm, top]", "eval.curve_stages"),
        ("nonsense", "key=value"),
    ],
)
def test_bad_values_are_refused_naming_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_file_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rbm:\n  hiden_size: 3\n")
    with pytest.raises(ConfigError, match=r"rbm\.hiden_size"):
        load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rbm: [1, 2\n")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(bad)


def test_finetune_epochs_zero_is_allowed():
    assert load_config(None, ["finetune.epochs=0"]).finetune.epochs == 0


def test_override_parsing():
    assert load_config(None, ["rbm.learning_rate=1e-3"]).rbm.learning_rate == 0.001
    assert parse_override("data.root=/x/y") == ("data.root", "/x/y")
    assert set(keys(LabConfig)) >= {"rbm.cd_k", "eval.ais_betas", "finetune.epochs"}
    assert load_config(None, []).eval.raise_stages == ["rbm", "dbn", "finetune"]
    assert load_config(None, ["eval.raise_stages=[rbm]"]).eval.raise_stages == ["rbm"]
    assert load_config(None, []).eval.curve_stages == ["rbm", "dbn", "finetune"]
    assert load_config(None, ["eval.curve_stages=[rbm]"]).eval.curve_stages == ["rbm"]


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"rbm": {"cd_k": 1.5}}, "config key rbm.cd_k: input should be a valid integer, got 1.5"),
        ({"rbm": {"cd_k": True}}, "config key rbm.cd_k: input should be a valid integer, got True"),
        ({"rbm": {"cd_k": "3"}}, "config key rbm.cd_k: input should be a valid integer, got '3'"),
        ({"rbm": {"persistent": "yes"}}, "config key rbm.persistent: input should be a valid boolean, got 'yes'"),
        ({"rbm": 3}, "config key rbm: input should be a valid dictionary or instance of RBMConfig, got 3"),
        ({"device": "tpu"}, "config key device: input should be 'auto', 'cpu' or 'cuda', got 'tpu'"),
        ({"eval": {"raise_betas": 2}},
         "config key eval.raise_betas: input should be greater than or equal to 3, got 2"),
    ],
)
def test_strict_values_one_line_each(tmp_path, mapping, message):
    """Strict types: no string for a number, no float or bool for an integer; one line naming the key."""
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(mapping))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == message


def test_sections_are_typed_and_frozen():
    config = load_config(None, ["rbm.cd_k=3"])
    assert config.rbm.cd_settings().cd_k == 3 and config.dbn.cd_settings(50).batch_size == 50
    with pytest.raises(Exception, match="frozen"):
        config.rbm.cd_k = 5  # a validated config is never changed in place: `with_values` makes a new one
    assert config.with_values({"rbm.cd_k": 5}).rbm.cd_k == 5 and config.rbm.cd_k == 3
    with pytest.raises(ConfigError, match=r"rbm\.cd_k"):
        config.with_values({"rbm.cd_k": 0})


def test_the_stored_form_reads_back_the_same():
    config = load_config("lab", ["rbm.learning_rate=1e-3", "data.subset=500"])
    assert LabConfig.model_validate(config.to_dict()) == config


def test_get_dotted_reads_nested_keys_and_says_what_is_missing():
    from rbm_study.core.config import get_dotted

    config = {"rbm": {"cd_k": 3}, "seed": 1}
    assert get_dotted(config, "rbm.cd_k") == 3 and get_dotted(config, "seed") == 1
    assert get_dotted(config, "rbm.epochs", None) is None
    assert get_dotted(config, "seed.x", "absent") == "absent"  # a value where a section was expected
    with pytest.raises(KeyError, match=r"rbm\.epochs"):
        get_dotted(config, "rbm.epochs")
