"""Local emulators of the backends step operators submit to, for offline tests of flavors and DAGs.

Each emulator speaks its service's real wire protocol on 127.0.0.1 so the real client libraries are
used unchanged; import the one you need, e.g. ``airflow_stepops.testing.kubernetes``. All of them
implement one interface, ``_kit.Emulator`` (start/stop, ``jobs``, ``state``/``status``,
``wait_for_state``, ``inject("preemption" | "failure", job)``, ``pids``), and run job processes through
the kit's process-group helpers; ``python -m airflow_stepops.testing FLAVOR`` runs any of them. Nothing
here imports Airflow.
"""
