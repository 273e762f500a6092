"""Optuna's dashboard on a study's database, as the README and docker/compose.yaml run it
(`optuna-dashboard URL --host 127.0.0.1`), on both backends: it lists the study rbm-study wrote and
shows exactly its completed trials, with their numbers, learning curves and the same best trial as
`rbm-study status`. (Ray's dashboard is the head's job server of tests/study/test_jobs.py.)"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

from rbm_study.study.storage import parse_db
from tests.conftest import Database
from tests.study.conftest import cli, kill_group, needs_mnist, query, start, wait_for, write_config
from tests.study.test_cluster import free_port

DASHBOARD = Path(sys.executable).parent / "optuna-dashboard"


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def _answers(url: str) -> bool:
    try:
        _get(f"{url}/api/studies")
        return True
    except OSError:
        return False


@pytest.mark.slow
@needs_mnist()
def test_optuna_dashboard_shows_the_study_as_rbm_study_stored_it(tmp_path, db: Database):
    config = write_config(tmp_path, search={"num_samples": 3, "sampler": "grid",
                                            "space": {"rbm.cd_k": [1, 2, 3]}})
    launched = cli("launch", str(config), "--db", db.arg, "--name", "dash", "--quiet")
    assert launched.returncode == 0, launched.stdout + launched.stderr

    url, log = f"http://127.0.0.1:{free_port()}", tmp_path / "dashboard.log"
    server = start([str(DASHBOARD), parse_db(db.arg).connect_url, "--host", "127.0.0.1", "--port",
                    url.rsplit(":", 1)[1]], log)
    try:
        wait_for(lambda: _answers(url), 120, "Optuna's dashboard", server, log)
        studies = {s["study_name"]: s for s in _get(f"{url}/api/studies")["study_summaries"]}
        assert set(studies) == {"dash"}
        detail = _get(f"{url}/api/studies/{studies['dash']['study_id']}")
    finally:
        kill_group(server)

    def attrs(trial: dict) -> dict[str, str]:
        return {a["key"]: a["value"] for a in trial["user_attrs"]}

    complete = [t for t in detail["trials"] if t["state"] == "Complete"]
    numbers = sorted(n for (n,) in query(db, "SELECT number FROM rbm_trials WHERE state = 'completed'"))
    assert sorted(int(attrs(t)["rbm_study_trial"]) for t in complete) == numbers == [0, 1, 2]
    assert detail["has_intermediate_values"]
    for trial in complete:  # the learning curve: train_recon_error at every epoch of every stage
        assert len(trial["intermediate_values"]) >= 4, trial["number"]
    best = json.loads(cli("status", "--db", db.arg, "--json").stdout)["best"]["trial"]
    assert [int(attrs(t)["rbm_study_trial"]) for t in detail["best_trials"]] == [best]
