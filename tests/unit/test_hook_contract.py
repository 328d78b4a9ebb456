"""The hook contract is explicit: a flavor's hook missing a method is refused as it is defined, and the
backend request of a submission is built and validated once."""

from __future__ import annotations

import pytest

from airflow_stepops.flavors import FLAVORS
from airflow_stepops.hooks.base import StepOperatorHook

from .localjobs import make_hook, make_spec, wait_terminal


def test_a_flavor_hook_missing_a_method_is_refused_when_defined():
    with pytest.raises(TypeError, match=r"PartialHook \(flavor 'partial'\) does not implement the hook contract: "
                                        r"cancel, get_status missing"):
        class PartialHook(StepOperatorHook):
            flavor = "partial"

            def build_request(self, spec):
                return {}

            def find_job(self, identity):
                return None

            def submit(self, spec):
                return {"flavor": "partial", "job_id": "1"}


def test_a_hook_missing_a_method_cannot_be_instantiated():
    class Unfinished(StepOperatorHook):  # no flavor: a shared base may leave methods to its subclasses
        def submit(self, spec):
            return {"flavor": "x", "job_id": "1"}

    with pytest.raises(TypeError, match="abstract.*build_request"):
        Unfinished()


def test_every_flavor_hook_implements_the_contract():
    assert {name: sorted(flavor.hook().__abstractmethods__) for name, flavor in FLAVORS.items()} == {
        name: [] for name in FLAVORS}


def _add(a, b):
    return a + b


def test_a_submission_builds_its_request_once(tmp_path, monkeypatch):
    hook = make_hook(tmp_path)
    built = []
    build = type(hook).build_request
    monkeypatch.setattr(type(hook), "build_request", lambda self, spec: built.append(spec) or build(self, spec))
    spec = make_spec(hook, _add, 1, 2)
    assert hook.prepare(spec) is hook.prepare(spec)  # the operator validates with it before writing anything
    handle = hook.submit(spec)
    assert len(built) == 1
    assert wait_terminal(hook, handle).state.value == "succeeded"
