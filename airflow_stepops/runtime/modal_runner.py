"""The function each Modal step calls: unpack the bundle, run the step, return its output.

It is deployed as a serialized Modal function (pickled by value, so images need no airflow_stepops):
the bundle arrives as the call's argument and the output leaves as its return value, both gzip-tar
bytes, which Modal moves through its blob store when they are large. The step itself runs in a
child process through ``pod_entry`` (its source travels with the call), so its prints reach Modal's
logs as they happen. Stdlib-only, like the rest of ``runtime``.
"""

from __future__ import annotations


def run_step(archive: bytes, entry_source: str, env: dict[str, str]) -> bytes:
    """Run one step try; the return value is the output directory as gzip-tar bytes (never raises for
    a failing step: its error travels in the output as ``error.json``)."""
    import io
    import os
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
        code = subprocess.run([sys.executable, "-c", entry_source], env=child_env, check=False).returncode
        print(f"[stepops] step finished with exit code {code}", flush=True)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
            for name in sorted(os.listdir(output)):
                tar.add(os.path.join(output, name), arcname=name)
        return buffer.getvalue()
