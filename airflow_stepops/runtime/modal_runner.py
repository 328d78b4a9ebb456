"""The function each Modal step calls: unpack the bundle, run the step, return its output.

It is deployed as a serialized Modal function (pickled by value, so images need no airflow_stepops):
the bundle arrives as the call's argument and the output leaves as its return value, both gzip-tar
bytes, which Modal moves through its blob store when they are large. The step itself runs in a
child process through ``pod_entry`` (its source travels with the call), so its prints reach Modal's
logs as they happen. A failing step fails the call (Modal shows it failed) with an exception whose text
carries the step's ``error.json``, base64-encoded after ``ERROR_MARKER``, so the worker gets the remote
error without unpickling anything. Stdlib-only, like the rest of ``runtime``.
"""

from __future__ import annotations

ERROR_MARKER = "stepops-error:"
#: the most of a failing step's error.json the exception carries (Modal cuts exception texts near 2 MiB)
MAX_ERROR_BYTES = 64 * 1024


def run_step(archive: bytes, entry_source: str, env: dict[str, str]) -> bytes:
    """Run one step try; the return value is the output directory as gzip-tar bytes. A failing step
    raises a ``RuntimeError`` carrying its ``error.json``."""
    import base64
    import io
    import json
    import os
    import signal
    import subprocess
    import sys
    import tarfile
    import tempfile

    with tempfile.TemporaryDirectory(prefix="stepops-") as work:
        bundle, output = os.path.join(work, "bundle"), os.path.join(work, "output")
        os.makedirs(bundle)
        os.makedirs(output)
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(bundle, filter="data")
            else:  # Python without extraction filters; the archive is our own
                tar.extractall(bundle)
        child_env = {**os.environ, **env, "STEPOPS_BUNDLE_PATH": bundle, "STEPOPS_OUTPUT_PATH": output,
                     "PYTHONUNBUFFERED": "1"}
        child = subprocess.Popen([sys.executable, "-c", entry_source], env=child_env)

        def forward(signum: int, _frame: object) -> None:  # Modal stopping the container: let the step checkpoint
            child.send_signal(signum)

        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[signum] = signal.signal(signum, forward)
            except ValueError:  # not the main thread: the signal reaches the step's process group anyway
                pass
        try:
            code = child.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        print(f"[stepops] step finished with exit code {code}", flush=True)
        if code:
            try:
                with open(os.path.join(output, "error.json"), "rb") as fh:
                    raw = fh.read()
                error = json.loads(raw)
            except (OSError, ValueError):
                error = {"type": "airflow_stepops.exceptions.StepFailedError",
                         "message": f"the step exited with code {code}", "traceback": ""}
                raw = json.dumps(error).encode()
            if len(raw) > MAX_ERROR_BYTES:  # keep the end of the traceback: where it failed
                error["message"] = str(error.get("message", ""))[:8000]
                error["traceback"] = "...\n" + str(error.get("traceback", ""))[-(MAX_ERROR_BYTES // 2):]
                raw = json.dumps(error).encode()
            summary = f"{error.get('type', 'Exception')}: {error.get('message', '')}"[:2000]
            raise RuntimeError(f"{summary} [{ERROR_MARKER}{base64.b64encode(raw).decode()}]")
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
            for name in sorted(os.listdir(output)):
                tar.add(os.path.join(output, name), arcname=name)
        return buffer.getvalue()
