"""Entry point of a step's container when no volume is shared: unpack, run, ship the output back.

The Kubernetes flavor starts ``python -c <this file> `` in the step's image. The bundle arrives in the
pod spec itself (``STEPOPS_BUNDLE_PARTS`` environment variables of base64 gzip-tar), from a mounted
volume (``STEPOPS_BUNDLE_PATH``) or, when too large for the spec, from a ``file://`` artifact store
the pod shares with the workers (``STEPOPS_BUNDLE_URI``, e.g. an NFS or hostPath mount at the same
path). The output goes to a mounted volume (``STEPOPS_OUTPUT_PATH``), else, when small, back through
the container's termination message, which does not depend on the pod log: the kubelet rotates logs
(``containerLogMaxSize``) and serves only the current file, but keeps the message in the pod status.
The message's last line is the output record ``<prefix>data:<sha256>:<base64 archive>`` when the
archive fits; a larger one is printed at the end of the pod log between markers and the record is
``<prefix>log:<sha256>:<size>``, so a block a rotation cut is detected, never taken. Outputs over the
inline limit are copied to the shared ``STEPOPS_OUTPUT_URI``.

Stdlib-only like ``bootstrap.py``. Exit code: the step's (0 success, 1 the step raised, 2 bad
bundle), or 3 when the output could not be shipped.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile

#: every line of the output block carries this prefix; lines without it are never part of the data
PREFIX = "::stepops-output:{marker}:"
LINE_CHARS = 8192  # well under the 16 KiB at which container runtimes split log lines
#: the kubelet keeps the last 4096 bytes of a termination message; the record may use all but the
#: summary line's share (https://kubernetes.io/docs/tasks/debug/debug-application/determine-reason-pod-failure/)
MESSAGE_BYTES = 4096
RECORD_BYTES = MESSAGE_BYTES - 512


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def _extract(archive: bytes, target: str) -> None:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(target, filter="data")
        else:  # Python without extraction filters; the archive is our own
            tar.extractall(target)


def _shared_path(uri: str) -> str:
    """The local path of a ``file://`` store this pod shares with the workers, or a clear error. The
    worker wrote the step's bundle before the Job was created, so the bundle is the proof of sharing.
    Object stores are never reached from here: images need nothing but Python and cloudpickle."""
    marker = _env("STEPOPS_BUNDLE_URI").rstrip("/") + "/meta.json"
    if uri.startswith("file://") and os.path.exists(marker[len("file://"):]):
        return uri[len("file://"):]
    return _unshared(uri)


def _unshared(uri: str) -> str:
    raise RuntimeError(f"{uri} is too large to travel in the pod spec or log, and its artifact store is not a "
                       "volume this pod shares with the Airflow workers; use a pvc:// artifact_store (or a "
                       "file:// one mounted at the same path in pods and workers), or raise "
                       "inline_transfer_max_size")


def _fetch(uri: str, destination: str) -> None:
    shutil.copyfile(_shared_path(uri), destination)


def stage_bundle(workdir: str) -> str:
    """The local directory of the bundle (and of inline input artifacts under ``refs/``)."""
    parts = int(_env("STEPOPS_BUNDLE_PARTS", "0") or 0)
    if parts:
        data = "".join(_env(f"STEPOPS_BUNDLE_{index}") for index in range(parts))
        archive = base64.b64decode(data)
        if hashlib.sha256(archive).hexdigest() != _env("STEPOPS_BUNDLE_SHA256"):
            raise RuntimeError("the inline bundle is damaged (sha256 mismatch)")
        bundle = os.path.join(workdir, "bundle")
        os.makedirs(bundle)
        _extract(archive, bundle)
        return bundle
    if _env("STEPOPS_BUNDLE_PATH"):
        return _env("STEPOPS_BUNDLE_PATH")
    uri = _env("STEPOPS_BUNDLE_URI").rstrip("/")
    bundle = os.path.join(workdir, "bundle")
    os.makedirs(bundle)
    for name in ("payload.pkl", "bootstrap.py", "meta.json"):
        _fetch(f"{uri}/{name}", os.path.join(bundle, name))
    return bundle


def stage_refs(bundle: str, workdir: str) -> list[str]:
    """``--ref INDEX=PATH`` arguments: inline in the bundle, on a mounted volume, or fetched."""
    argv: list[str] = []
    refs_file = _env("STEPOPS_REFS_FILE")
    if refs_file:  # where the environment is small (SageMaker: 512 characters a value)
        with open(refs_file, encoding="utf-8") as fh:
            listed = json.load(fh)
    else:
        listed = json.loads(_env("STEPOPS_REFS", "{}"))
    for index, source in sorted(listed.items(), key=lambda kv: int(kv[0])):
        if "inline" in source:
            path = os.path.join(bundle, source["inline"])
        elif "path" in source:
            path = source["path"]
        else:
            path = os.path.join(workdir, f"ref-{index}.pkl")
            _fetch(source["uri"], path)
        argv += ["--ref", f"{index}={path}"]
    return argv


def run_step(argv: list[str]) -> int:
    """Run bootstrap as a child; SIGTERM from the kubelet is passed on so the step can clean up."""
    child = subprocess.Popen(argv)

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    code = child.wait()
    return 128 - code if code < 0 else code


def _archive(directory: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        for name in sorted(os.listdir(directory)):
            tar.add(os.path.join(directory, name), arcname=name)
    return buffer.getvalue()


def print_inline(archive: bytes, marker: str) -> None:
    """``<prefix>begin:``, numbered base64 chunks ``<prefix><n>:<data>``, ``<prefix>end:<sha256>``."""
    text = base64.b64encode(archive).decode()
    prefix = PREFIX.format(marker=marker)
    out = sys.stdout
    out.write(f"{prefix}begin:\n")
    for number, start in enumerate(range(0, len(text), LINE_CHARS)):
        out.write(f"{prefix}{number}:{text[start:start + LINE_CHARS]}\n")
    out.write(f"{prefix}end:{hashlib.sha256(archive).hexdigest()}\n")
    out.flush()


def upload(directory: str, uri: str) -> None:
    """Copy the output directory to the shared store; result.json/error.json last (they mark completion)."""
    target = _shared_path(uri)
    os.makedirs(target, exist_ok=True)
    for name in sorted(os.listdir(directory), key=lambda n: n in ("result.json", "error.json")):
        shutil.copyfile(os.path.join(directory, name), os.path.join(target, name + ".tmp"))
        os.replace(os.path.join(target, name + ".tmp"), os.path.join(target, name))


def output_record(archive: bytes, marker: str, limit: int) -> str | None:
    """The termination-message record of an output archive (printing it to the log when it does not
    fit the message), or None when it is larger than ``limit``."""
    prefix = PREFIX.format(marker=marker)
    digest = hashlib.sha256(archive).hexdigest()
    record = f"{prefix}data:{digest}:{base64.b64encode(archive).decode()}"
    if len(record) <= RECORD_BYTES:
        return record
    if len(archive) > limit:
        return None
    print_inline(archive, marker)
    return f"{prefix}log:{digest}:{len(archive)}"


def ship_output(output: str, marker: str) -> str:
    """Ship the output; returns its termination-message record ("" when it went to the shared store)."""
    limit = int(_env("STEPOPS_INLINE_MAX_BYTES", "524288"))
    raw = sum(os.path.getsize(os.path.join(output, n)) for n in os.listdir(output))
    record = output_record(_archive(output), marker, limit) if raw <= 8 * limit else None
    if record is not None:
        return record
    upload(output, _env("STEPOPS_OUTPUT_URI"))
    print(f"[stepops] output of {raw} bytes written to {_env('STEPOPS_OUTPUT_URI')}", flush=True)
    return ""


def _failure_record(message: str) -> dict:
    return {"type": "airflow_stepops.exceptions.StepFailedError", "message": message, "traceback": "",
            "phase": "transfer"}


def summary(output: str, code: int) -> str:
    """The step's error for ``kubectl describe`` and the failure message (instead of the last log lines)."""
    try:
        with open(os.path.join(output, "error.json"), encoding="utf-8") as fh:
            error = json.load(fh)
        return f"{error.get('type', 'error')}: {error.get('message', '')}"
    except (OSError, ValueError):
        return f"the step exited with code {code}"


def write_termination_message(text: str, record: str = "") -> None:
    """``text`` cut to fit, then the output record as the last line, within the kubelet's 4096 bytes."""
    path = _env("STEPOPS_TERMINATION_LOG")
    if not path:
        return
    tail = ("\n" + record if text else record).encode()
    data = text.encode()[:MESSAGE_BYTES - len(tail)].decode(errors="ignore").encode() + tail
    try:
        with open(path, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        print(f"[stepops] cannot write the termination message: {exc}", file=sys.stderr, flush=True)


def finished_before(output: str) -> int | None:
    """The exit code of a run of this try that already wrote its outcome to the shared output path (a
    worker the backend restarted, e.g. for VM maintenance): the step must not run, nor its result be
    written, twice."""
    for name, code in (("result.json", 0), ("error.json", 1)):
        if os.path.exists(os.path.join(output, name)):
            print(f"[stepops] {name} of this try is already in {output}: the worker was restarted after the "
                  "step finished; not running it again", flush=True)
            return code
    return None


def prepare_checkpoint_dir() -> None:
    """Create ``STEPOPS_CHECKPOINT_DIR`` as the step's own user, so the step can write it at once (on Kubernetes
    only the claim is mounted: a directory the kubelet made for a subPath would belong to root). A step that
    does not checkpoint must not fail for it, so a failure is only reported."""
    path = _env("STEPOPS_CHECKPOINT_DIR")
    if not path:
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        print(f"[stepops] cannot create STEPOPS_CHECKPOINT_DIR {path}: {exc}", file=sys.stderr, flush=True)


def main() -> int:
    marker = _env("STEPOPS_MARKER", "step")
    if _env("STEPOPS_OUTPUT_PATH"):
        done = finished_before(_env("STEPOPS_OUTPUT_PATH"))
        if done is not None:
            return done
    prepare_checkpoint_dir()
    workdir = tempfile.mkdtemp(prefix="stepops-")
    output = _env("STEPOPS_OUTPUT_PATH") or os.path.join(workdir, "output")
    os.makedirs(output, exist_ok=True)
    try:
        bundle = stage_bundle(workdir)
        refs = stage_refs(bundle, workdir)
    except Exception as exc:
        print(f"[stepops] cannot stage the step: {exc}", file=sys.stderr, flush=True)
        with open(os.path.join(output, "error.json"), "w", encoding="utf-8") as fh:
            json.dump({**_failure_record(f"cannot stage the step bundle: {exc}"), "phase": "load"}, fh)
        code = 2
    else:
        code = run_step([sys.executable, os.path.join(bundle, "bootstrap.py"), "--bundle", bundle,
                         "--output", output, *refs])
    sys.stdout.flush()
    sys.stderr.flush()
    if _env("STEPOPS_OUTPUT_PATH"):
        if code:
            write_termination_message(summary(output, code))
        return code
    try:
        record = ship_output(output, marker)
        text = summary(output, code) if code else ""
    except Exception as exc:
        print(f"[stepops] cannot ship the step's output: {exc}", file=sys.stderr, flush=True)
        failed = os.path.join(workdir, "failed")
        os.makedirs(failed)
        with open(os.path.join(failed, "error.json"), "w", encoding="utf-8") as fh:
            json.dump(_failure_record(f"the step finished (exit code {code}) but its output could not be "
                                      f"shipped: {exc}"), fh)
        code, text, record = 3, summary(failed, 3), output_record(_archive(failed), marker, 1 << 20) or ""
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_termination_message(text, record)
    return code


if __name__ == "__main__":
    sys.exit(main())
