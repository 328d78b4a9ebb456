"""Local emulators of the backends step operators submit to, for offline tests of flavors and DAGs.

Each emulator speaks its service's real wire protocol on 127.0.0.1 so the real client libraries are
used unchanged; import the one you need, e.g. ``airflow_stepops.testing.kubernetes``. Nothing here
imports Airflow.
"""
