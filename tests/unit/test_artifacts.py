"""ArtifactRef reads: checksum verified in one pass, large payloads on the threaded paths."""

from __future__ import annotations

import hashlib
import io

import cloudpickle
import pytest

from airflow_stepops import ArtifactRef
from airflow_stepops.artifacts import _VerifyingReader
from airflow_stepops.bundle import StepIdentity, build_meta
from airflow_stepops.runtime import bootstrap


def _write(tmp_path, value) -> ArtifactRef:
    meta = build_meta(StepIdentity("d", "r", "t", -1, 1), multiple_outputs=False, max_result_bytes=10**9,
                      inline_result_max_bytes=10, task_label="d.t")
    entry = bootstrap.write_result(value, str(tmp_path), meta, cloudpickle)["return_value"]
    return ArtifactRef(uri=f"file://{tmp_path}/{entry['path']}", type=entry["type"], size=entry["size"],
                       sha256=entry["sha256"])


def test_large_result_round_trips_with_a_correct_checksum(tmp_path):
    payload = bytearray(range(256)) * (40 * 4096)  # 40 MiB: several hashing chunks
    ref = _write(tmp_path, payload)
    data = (tmp_path / "return_value.pkl").read_bytes()
    assert ref.size == len(data) and ref.sha256 == hashlib.sha256(data).hexdigest()
    assert ref.load() == payload


def test_a_modified_artifact_is_refused(tmp_path):
    ref = _write(tmp_path, {"weights": list(range(100))})
    path = tmp_path / "return_value.pkl"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its sha256"):
        ref.load()


def test_verifying_reader_is_right_when_the_caller_reuses_its_buffer():
    blob = bytes(range(256)) * (64 * 1024)  # 16 MiB
    reader = _VerifyingReader(io.BytesIO(blob))
    buffered = io.BufferedReader(reader, buffer_size=9 << 20)  # reuses one buffer for every read
    while buffered.read(3 << 20):
        pass
    reader.drain()
    assert reader.sha256.hexdigest() == hashlib.sha256(blob).hexdigest()


def test_using_a_ref_as_the_value_says_to_call_load(tmp_path):
    """A plain @task gets the ArtifactRef from XCom (Airflow's serde); treating it as the value names .load()."""
    import copy
    import pickle

    from airflow.sdk.serde import deserialize, serialize

    stored = _write(tmp_path, {"weights": list(range(100))})
    ref = deserialize(serialize(stored))  # what XCom hands a downstream task
    assert ref == stored and bool(ref) and copy.deepcopy(ref) == ref == pickle.loads(pickle.dumps(ref))
    hint = rf"this is an ArtifactRef to the step's result \(builtins.dict, \d+ bytes\) stored at {ref.uri}; call .load\(\)"
    for use in (lambda: ref["weights"], lambda: list(ref), lambda: len(ref), lambda: "weights" in ref):
        with pytest.raises(TypeError, match=hint):
            use()
    with pytest.raises(AttributeError, match=rf"ArtifactRef has no attribute 'keys': {hint}"):
        ref.keys()
    assert ref.load()["weights"][-1] == 99
