"""Session-wide Airflow home: one SQLite database for every test that needs Airflow's metadata DB.

The environment is set when this module is imported, before any test imports Airflow, so the
in-process Airflow and every Airflow subprocess the tests start share the same home.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_HOME = Path(os.environ.get("STEPOPS_TEST_AIRFLOW_HOME") or tempfile.mkdtemp(prefix="stepops-airflow-"))
os.environ["AIRFLOW_HOME"] = str(_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "tests" / "dags")
sys.path.insert(0, str(REPO / "tests" / "dags"))  # as Airflow does for its DAGs folder
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")
os.environ["AIRFLOW_CONN_LOCAL_STEP_OPERATOR"] = '{"conn_type": "stepops_local", "extra": {}}'


@pytest.fixture(scope="session")
def airflow_home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def airflow_db(airflow_home: Path) -> Path:
    """Migrate the shared metadata DB once per session."""
    marker = airflow_home / ".migrated"
    if not marker.exists():
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True,
                       env=os.environ.copy())
        marker.write_text("ok")
    return airflow_home
