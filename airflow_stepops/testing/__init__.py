"""Local emulators of the backends step operators submit to, for offline tests of flavors and DAGs.

Each emulator speaks its service's real wire protocol on 127.0.0.1 so the real client libraries are
used unchanged; import the one you need, e.g. ``airflow_stepops.testing.kubernetes``. Nothing here
imports Airflow.
"""

#: ``[database] sql_alchemy_connect_args`` for a SQLite metadata DB shared by several Airflow processes
#: (scheduler, triggerer, api-server, workers) on a busy test host: sqlite3 waits this long for a lock
#: instead of its default 5 s before "database is locked" ends the process
SQLITE_CONNECT_ARGS = {"timeout": 60}
