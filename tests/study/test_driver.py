"""The driver's judgement of where trials can run (study.driver)."""

from __future__ import annotations

import pytest

from rbm_study.study.config import load_study_config
from rbm_study.study.driver import unplaced
from tests.study.conftest import write_config


def _node(cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    """A node as `ray.nodes()` lists it (the keys the driver reads)."""
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return {"Alive": alive, "Resources": resources}


@pytest.mark.parametrize(
    ("resources", "nodes", "fits"),
    [
        ({"cpus_per_trial": 1}, [_node(2)], True),
        ({"cpus_per_trial": 2}, [_node(1), _node(2)], True),
        ({"cpus_per_trial": 4}, [_node(2), _node(2)], False),  # 4 CPUs in all, but a trial sits on one node
        ({"cpus_per_trial": 1}, [_node(8, alive=False)], False),
        ({"cpus_per_trial": 1, "gpus_per_trial": 0.5}, [_node(4, gpus=1)], True),
        ({"cpus_per_trial": 1, "gpus_per_trial": 0.5}, [_node(4), _node(1, gpus=1)], True),
        ({"cpus_per_trial": 2, "gpus_per_trial": 0.5}, [_node(4), _node(1, gpus=1)], False),
    ],
)
def test_a_trial_is_placed_only_on_one_live_node_with_all_it_asks_for(tmp_path, resources, nodes, fits):
    study = load_study_config(str(write_config(tmp_path, device="auto", resources=resources)), [])
    said = unplaced(study, nodes)
    assert (said is None) == fits, said
    if not fits:
        assert f"{resources['cpus_per_trial']:g} CPUs" in said and "resume" in said
        assert ("GPUs" in said) == ("gpus_per_trial" in resources)
