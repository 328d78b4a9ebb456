"""The step operator the Modal tests use: ``modal_step_operator`` on the session's Modal emulator."""

from __future__ import annotations

import json
import os

import pytest


@pytest.fixture(scope="session")
def modal_step_operator(md_emulator):
    """``modal_step_operator`` (environment ``main``, apps ``stepops-tests-<hash>``, ``TEAM=ml`` for every
    step) and the ``hf-token`` Modal secret it attaches."""
    md_emulator.add_secret("hf-token", {"HF_TOKEN": "hf-test"}, environment="main")
    os.environ["AIRFLOW_CONN_MODAL_STEP_OPERATOR"] = json.dumps({"conn_type": "stepops_modal", "extra": {
        "environment": "main", "app_name": "stepops-tests", "secrets": ["hf-token"],
        "environment_variables": {"TEAM": "ml"}}})
    return "modal_step_operator"
