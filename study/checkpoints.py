"""Stage checkpoints of study trials: what they are keyed by, how they travel, where trials find them.

After tasks 1 and 2 a trial has a `core.pipeline.LabCheckpoint`. An interrupted trial (a resume
after the driver died) or a retried one (its worker died) starts again from the last of them
instead of from scratch. The database stays the one source of truth and a cluster needs no shared
filesystem:

- the trainable puts each checkpoint into `CheckpointStore`, a small named Ray actor that the
  driver starts on the head node (so a retry on any node finds it at once), and reports it to the
  driver, which writes it to `rbm_checkpoints` (one row a trial, deleted when the trial finishes);
- large values a trial reports (checkpoints, the final weight files) go through the store as
  blobs (`send_blob` / `receive_blob`), and the result itself carries only their name. A Tune
  result above Ray's inline limit (100 KB) waits in the reporting node's object store until the
  driver fetches it; if that node dies in between, Tune's controller (ray 2.58) raises "Failed to
  retrieve object" and the whole study stops instead of retrying the trial. Put into the store on
  the head node first, the bytes outlive the worker. Blob names carry the sending trial's id, so
  the driver drops what a trial sent but died before reporting (`forget_blobs`) when that trial
  ends or is retried;
- a driver starting (`launch` or `resume`) seeds the store from the database with the
  checkpoints of the study's `interrupted` trials.

The key is not a trial id but the trial's config: a run is seeded and deterministic, so a
checkpoint of any trial with the same config is valid for every trial with that config, and no
mapping from new Ray trials to old rows has to happen before a trainable asks. The key is the
SHA-256 of the full lab config as canonical JSON with `device` resolved to the device type the
trial runs on (`auto` alone does not say, and a CUDA generator state cannot resume a CPU run).

What is stored (`pack`) is the `LabCheckpoint` bytes behind a small JSON header holding the epoch
metrics of the finished stages: a trial that resumes sends them again, so every trial row has its
whole curve (even one that resumed from another trial's checkpoint) and ASHA sees the same epochs
as in a run from scratch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from typing import Any

from rbm_study.core.config import LabConfig

log = logging.getLogger(__name__)

STORE_NAME = "rbm_study_checkpoints"
_MAGIC = b"rbm-study checkpoint 1\n"
_HEAD_NODE = "node:__internal_head__"
_TIMEOUT_S = 60.0

EpochRow = tuple[str, int, dict[str, float]]  # stage, epoch (from 1), that epoch's metrics


def config_key(lab: LabConfig) -> str:
    """SHA-256 hex of a lab config as canonical JSON, `device` resolved (see the module docstring)."""
    from rbm_study.core.pipeline import resolve_device

    resolved = {**lab.to_dict(), "device": resolve_device(lab.device).type}
    text = json.dumps(resolved, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def pack(lab_checkpoint: bytes, epochs: list[EpochRow]) -> bytes:
    header = json.dumps({"epochs": [[s, e, m] for s, e, m in epochs]}).encode()
    return _MAGIC + len(header).to_bytes(8, "big") + header + lab_checkpoint


def unpack(data: bytes) -> tuple[bytes, list[EpochRow]]:
    """(LabCheckpoint bytes, epoch rows); ValueError for bytes `pack` did not make."""
    if not data.startswith(_MAGIC):
        raise ValueError("not an rbm-study checkpoint")
    start = len(_MAGIC) + 8
    size = int.from_bytes(data[len(_MAGIC):start], "big")
    header = json.loads(data[start:start + size])
    epochs = [(str(s), int(e), {k: float(v) for k, v in m.items()}) for s, e, m in header["epochs"]]
    return data[start + size:], epochs


_BLOB_PREFIX = "rbm-study-blob:"


def _blob_prefix(owner: str) -> str:
    return f"{_BLOB_PREFIX}{owner}/"


class CheckpointStore:
    """config key -> packed checkpoint, in memory (the database keeps the durable copy); and blobs
    in transit from trials to the driver, each taken once."""

    def __init__(self, seed: dict[str, bytes] | None = None):
        self._data: dict[str, bytes] = dict(seed or {})
        self._blobs: dict[str, Any] = {}

    def put_blob(self, name: str, value: Any) -> None:
        self._blobs[name] = value

    def take_blob(self, name: str) -> Any:
        return self._blobs.pop(name, None)

    def drop_blobs(self, owner: str) -> int:
        """Forget the blobs `owner` sent and nobody took (it died between sending and reporting);
        returns how many there were."""
        prefix = _blob_prefix(owner)
        names = [name for name in self._blobs if name.startswith(prefix)]
        for name in names:
            del self._blobs[name]
        return len(names)

    def put(self, key: str, data: bytes) -> None:
        self._data[key] = data

    def get(self, key: str) -> bytes | None:
        return self._data.get(key)

    def remove(self, key: str) -> None:
        self._data.pop(key, None)

    def keys(self) -> list[str]:
        return sorted(self._data)


def start_store(seed: dict[str, bytes]) -> Any:
    """Start the named store in the driver's namespace (driver only; keep the handle while Tune runs).

    It takes no CPU and sits on the head node where there is one: a worker node dying must not
    take the checkpoints of its own trials with it.
    """
    import ray

    options: dict[str, Any] = {"name": STORE_NAME, "num_cpus": 0, "max_restarts": 0}
    if _HEAD_NODE in ray.cluster_resources():
        options["resources"] = {_HEAD_NODE: 0.001}
    store = ray.remote(CheckpointStore).options(**options).remote(seed)
    ray.get(store.keys.remote(), timeout=120)  # started and seeded before the first trial asks
    return store


def find_store() -> Any | None:
    """The study's store from inside a trial, or None (no Ray, or no driver made one: a test)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return ray.get_actor(STORE_NAME)
    except Exception:
        return None


def store_get(store: Any | None, key: str) -> bytes | None:
    if store is None:
        return None
    import ray

    try:
        return ray.get(store.get.remote(key), timeout=_TIMEOUT_S)
    except Exception as err:
        log.warning("checkpoint store unreachable, starting from scratch: %s", err)
        return None


def store_put(store: Any | None, key: str, data: bytes) -> None:
    """Wait for the put: a worker dying right after must not lose it (a retry asks at once)."""
    if store is None:
        return
    import ray

    try:
        ray.get(store.put.remote(key, data), timeout=_TIMEOUT_S)
    except Exception as err:
        log.warning("checkpoint store unreachable; the driver still gets the checkpoint: %s", err)


def send_blob(store: Any | None, value: Any, owner: str = "") -> Any:
    """What a trial reports in place of a large `value`: a short reference once the store holds it
    (see the module docstring), or `value` itself without a reachable store. `owner` (the trial's
    id) lets the driver drop what a trial sent but never reported (`forget_blobs`)."""
    if store is None:
        return value
    import ray

    name = _blob_prefix(owner) + uuid.uuid4().hex
    try:
        ray.get(store.put_blob.remote(name, value), timeout=_TIMEOUT_S)
    except Exception as err:
        log.warning("checkpoint store unreachable, reporting the value itself: %s", err)
        return value
    return name


def receive_blob(reported: Any) -> Any:
    """The value behind what `send_blob` reported (driver side); None if the store lost it."""
    if not (isinstance(reported, str) and reported.startswith(_BLOB_PREFIX)):
        return reported
    store = find_store()
    if store is None:
        log.warning("no checkpoint store to fetch %s from", reported)
        return None
    import ray

    try:
        return ray.get(store.take_blob.remote(reported), timeout=_TIMEOUT_S)
    except Exception as err:
        log.warning("could not fetch %s from the checkpoint store: %s", reported, err)
        return None


def forget_blobs(owner: str) -> None:
    """Driver side, once a trial has ended or is about to be retried: its blobs still in the store
    were sent by a run that died before reporting them, and nobody will take them."""
    store = find_store()
    if store is None:
        return
    try:
        store.drop_blobs.remote(owner)  # not waited for: the store is a cache, the database decides
    except Exception as err:
        log.warning("could not drop the blobs of trial %s from the store: %s", owner, err)
