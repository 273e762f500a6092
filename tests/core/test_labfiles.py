import pytest
import torch

from rbm_study.core import labfiles
from rbm_study.core.models import DBN, RBM, UpDownDBN


def random_rbm(V: int, H: int, seed: int) -> RBM:
    g = torch.Generator().manual_seed(seed)
    return RBM(torch.randn(V, H, generator=g), torch.randn(V, generator=g), torch.randn(H, generator=g))


@pytest.fixture
def models():
    dbn = DBN([random_rbm(784, 100, 0), random_rbm(100, 100, 1)])
    ft = UpDownDBN.from_dbn(dbn)
    ft.R.add_(1.0)  # untied: recognition differs from generation
    return {"rbm": random_rbm(784, 100, 2), "dbn": dbn, "finetune": ft}


EXPECTED = {
    "rbm": {"rbm_w": (784, 100), "rbm_v": (784,), "rbm_h": (100,)},
    "dbn": {"W1": (784, 100), "v1": (784,), "h1": (100,), "W2": (100, 100), "h2": (100,), "h1_up": (100,)},
    "finetune": {"R1": (784, 100), "W1_down": (100, 784), "v1": (784,), "h1_up": (100,), "h1_down": (100,),
                 "W2": (100, 100), "h2": (100,)},
}


@pytest.mark.parametrize("kind", ["rbm", "dbn", "finetune"])
def test_keys_shapes_and_round_trip(models, kind, tmp_path):
    path = labfiles.save(models[kind], tmp_path / labfiles.FILE_NAMES[kind])
    state = torch.load(path, weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == EXPECTED[kind]
    again = labfiles.state_of(labfiles.load(path))
    assert state.keys() == again.keys()
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert labfiles.kind_of_state(state) == kind


def test_dbn_biases_keep_their_roles(models):
    dbn = models["dbn"]
    state = labfiles.state_of(dbn)
    assert torch.equal(state["h1"], dbn.top.a)  # the top RBM's visible bias
    assert torch.equal(state["h1_up"], dbn.layers[0].b)  # the first RBM's hidden bias


def test_student_dbn_file_uses_one_bias_for_both_roles(models, tmp_path):
    state = labfiles.state_of(models["dbn"])
    del state["h1_up"]
    torch.save(state, tmp_path / "zad2_dbn.th")
    dbn = labfiles.load(tmp_path / "zad2_dbn.th")
    assert torch.equal(dbn.layers[0].b, state["h1"]) and torch.equal(dbn.top.a, state["h1"])


def test_foreign_files_are_refused(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "x.th")
    with pytest.raises(labfiles.LabFileError, match="match none"):
        labfiles.load(tmp_path / "x.th")
    (tmp_path / "y.th").write_text("not a torch file")
    with pytest.raises(labfiles.LabFileError, match=r"not a lab weight file: torch\.save writes a zip archive"):
        labfiles.load(tmp_path / "y.th")
    torch.save({"rbm_w": slice(1, 2)}, tmp_path / "code.th")  # loading it would need weights_only=False
    refusal = r"not a lab weight file: Unsupported global: GLOBAL slice"
    with pytest.raises(labfiles.LabFileError, match=refusal) as refused:
        labfiles.load(tmp_path / "code.th")
    assert "weights_only" not in str(refused.value)  # not torch's advice to load it unsafely
    torch.save({"rbm_w": torch.zeros(784, 10), "rbm_v": torch.zeros(784), "rbm_h": torch.zeros(11)}, tmp_path / "z.th")
    with pytest.raises(labfiles.LabFileError, match="shapes"):
        labfiles.load(tmp_path / "z.th")
