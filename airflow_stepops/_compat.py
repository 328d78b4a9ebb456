"""Small shims over Airflow APIs that moved between 3.1 and 3.3."""

from __future__ import annotations

import os
from typing import Any

try:
    from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowNotFoundException
except ImportError:  # Airflow < 3.2
    from airflow.exceptions import (  # type: ignore[no-redef]
        AirflowException,
        AirflowFailException,
        AirflowNotFoundException,
    )

__all__ = ["AirflowException", "AirflowFailException", "AirflowNotFoundException", "airflow_conf", "airflow_home",
           "dagbag_class"]


def airflow_conf() -> Any:
    try:
        from airflow.sdk.configuration import conf
    except ImportError:  # Airflow < 3.2
        from airflow.configuration import conf
    return conf


def airflow_home() -> str:
    home = airflow_conf().get("core", "airflow_home", fallback=None) or os.environ.get("AIRFLOW_HOME") or "~/airflow"
    return os.path.abspath(os.path.expanduser(home))


def dagbag_class() -> Any:
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow < 3.2
        from airflow.models.dagbag import DagBag  # type: ignore[no-redef]
    return DagBag
