"""Run one step from its bundle and write its result: the whole remote side of the step contract.

Usage: ``python bootstrap.py --bundle DIR --output DIR [--ref INDEX=PATH ...]``

Stdlib-only on purpose (plus ``cloudpickle``, needed to load the callable): this file travels with
every job, so images need neither Airflow nor this package. It must not import airflow, pydantic or
any cloud SDK. Exit codes: 0 success, 1 the step raised, 2 bad bundle or environment.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import socket
import sys
import time
import traceback
from typing import Any

if __name__.startswith("airflow_stepops."):  # imported on the worker
    from airflow_stepops.runtime import protocol
else:  # run from a job's bundle: protocol.py is beside this file
    import protocol  # type: ignore[import-not-found,no-redef]


class StepEnvironmentError(Exception):
    """The bundle cannot run here (Python version, missing cloudpickle, unknown format)."""


class ResultTooLargeError(Exception):
    """The step's result is larger than the step operator's ``max_result_size``."""


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


def _qualname(obj: object) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    module = cls.__module__
    if module.startswith("unusual_prefix_"):  # Airflow's internal name for a DAG file's module
        module = module.split("_", 3)[-1]
    return f"{module}.{cls.__qualname__}"


def _is_json_value(value: object, depth: int = 0) -> bool:
    if depth > 64:
        return False
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return value == value and value not in (float("inf"), float("-inf"))
    if type(value) is list:
        return all(_is_json_value(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(isinstance(k, str) and _is_json_value(v, depth + 1) for k, v in value.items())
    return False


HASH_CHUNK = 8 << 20


class _HashingWriter(io.RawIOBase):
    """File writer that hashes and counts as it goes and stops past a size limit.

    Large writes (a pickled array arrives as one buffer) are cut into chunks; each chunk is hashed
    in a helper thread while the next one is written (hashlib and file writes release the GIL), so
    the digest costs little extra time.
    """

    def __init__(self, fh: io.BufferedWriter, limit: int, name: str) -> None:
        self._fh, self._limit, self._name = fh, limit, name
        self.size = 0
        self.sha256 = hashlib.sha256()
        self._pool: Any = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        self.size += view.nbytes
        if self.size > self._limit:
            raise ResultTooLargeError(
                f"result {self._name!r} is larger than max_result_size ({self._limit} bytes) of this step "
                "operator; raise max_result_size in its connection or return a smaller value"
            )
        if view.nbytes <= HASH_CHUNK:
            self.sha256.update(view)
            self._fh.write(view)
            return view.nbytes
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stepops-hash")
        pending = None
        for offset in range(0, view.nbytes, HASH_CHUNK):
            chunk = view[offset:offset + HASH_CHUNK]
            if pending is not None:
                pending.result()  # chunks are hashed in order
            pending = self._pool.submit(self.sha256.update, chunk)
            self._fh.write(chunk)
        if pending is not None:
            pending.result()
        return view.nbytes

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        super().close()


def check_environment(meta: dict) -> None:
    if meta.get("format_version") != protocol.FORMAT_VERSION:
        raise StepEnvironmentError(
            f"bundle format {meta.get('format_version')!r} is not supported by this runtime "
            f"(format {protocol.FORMAT_VERSION}); use the same airflow-stepops version on both sides"
        )
    want = tuple(meta["python_version"][:2])
    have = tuple(sys.version_info[:2])
    if want != have:
        raise StepEnvironmentError(
            f"remote Python {have[0]}.{have[1]} differs from the worker's Python {want[0]}.{want[1]} "
            "that pickled this step; run steps in an image or interpreter with Python "
            f"{want[0]}.{want[1]}"
        )


def check_cloudpickle(meta: dict, cloudpickle) -> str:
    """Refuse another cloudpickle minor version (its pickles may not load: cloudpickle promises no
    compatibility across versions, https://github.com/cloudpipe/cloudpickle/issues/479); return the
    advice to give if another patch version then fails to load the step."""
    want, have = meta.get("cloudpickle_version"), getattr(cloudpickle, "__version__", "unknown")
    if not want or want == have:
        return ""
    advice = (f"remote cloudpickle {have} differs from the worker's cloudpickle {want} that pickled this step; "
              f"install the worker's version where steps run (pip install cloudpickle=={want})")
    if want.split(".")[:2] != have.split(".")[:2]:
        raise StepEnvironmentError(advice)
    return advice


def _load_cloudpickle(want: str):
    try:
        import cloudpickle
    except ImportError:
        raise StepEnvironmentError(
            f"cloudpickle is not installed for {sys.executable} (and there is no pip to install it); install the "
            f"workers' version in the step image (pip install cloudpickle=={want})"
        ) from None
    return cloudpickle


def _resolve_refs(value, refs: dict[int, str], cloudpickle, depth: int = 0):
    """Replace artifact markers (results of upstream steps) by the values they stand for."""
    if depth > 64:
        return value
    if type(value) is dict:
        if set(value) == {protocol.REF_MARKER}:
            index = value[protocol.REF_MARKER]
            path = refs.get(index)
            if path is None:
                raise StepEnvironmentError(f"input artifact #{index} was not staged for this job")
            with open(path, "rb") as fh:
                return cloudpickle.load(fh)
        return {k: _resolve_refs(v, refs, cloudpickle, depth + 1) for k, v in value.items()}
    if type(value) is list:
        return [_resolve_refs(v, refs, cloudpickle, depth + 1) for v in value]
    if type(value) is tuple:
        return tuple(_resolve_refs(v, refs, cloudpickle, depth + 1) for v in value)
    return value


def _encode_output(name: str, value, output_dir: str, meta: dict, cloudpickle) -> dict:
    if _is_json_value(value):
        text = json.dumps(value)
        if len(text.encode()) <= meta["inline_result_max_bytes"]:
            return {"kind": "json", "value": value}
    filename = f"{name}.pkl"
    path = os.path.join(output_dir, filename)
    with open(path, "wb") as fh:
        writer = _HashingWriter(fh, meta["max_result_bytes"], name)
        buffered = io.BufferedWriter(writer, buffer_size=1 << 20)
        try:
            cloudpickle.dump(value, buffered, protocol=5)
            buffered.flush()
        except ResultTooLargeError:
            fh.close()
            os.unlink(path)
            raise
    return {
        "kind": "artifact",
        "path": filename,
        "size": os.path.getsize(path),
        "sha256": writer.sha256.hexdigest(),
        "type": _qualname(value),
    }


def write_result(value, output_dir: str, meta: dict, cloudpickle) -> dict:
    if meta.get("multiple_outputs"):
        if type(value) is not dict or not all(isinstance(k, str) for k in value):
            raise TypeError(
                f"multiple_outputs=True needs the step to return a dict with str keys, got {_qualname(value)}"
            )
        outputs = {key: _encode_output(key, v, output_dir, meta, cloudpickle) for key, v in value.items()}
    else:
        outputs = {"return_value": _encode_output("return_value", value, output_dir, meta, cloudpickle)}
    return outputs


def _error_record(exc: BaseException) -> dict:
    return {
        "type": _qualname(exc),
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }


def _explain_memory_error(exc: BaseException) -> BaseException:
    """A MemoryError from hitting the local memory limit has no message: say which limit and setting."""
    limit = os.environ.get(protocol.Env.MEMORY_LIMIT_BYTES, "")  # set by the local launcher
    if not isinstance(exc, MemoryError) or not limit.isdigit():
        return exc
    size = int(limit)
    shown = f"{size / 2**30:.4g} GiB" if size >= 2**30 else f"{size / 2**20:.4g} MiB"
    detail = f" ({exc})" if str(exc) else ""
    explained = MemoryError(f"the step exceeded its memory limit of {shown} (ResourceSettings.memory){detail}; "
                            "raise resources.memory or make the step use less memory")
    explained.__cause__ = exc.__cause__
    return explained.with_traceback(exc.__traceback__)


def run(bundle_dir: str, output_dir: str, refs: dict[int, str]) -> int:
    os.makedirs(output_dir, exist_ok=True)
    started = time.time()
    base = {"format_version": protocol.FORMAT_VERSION, "host": socket.gethostname(), "python": sys.version.split()[0]}
    try:
        with open(os.path.join(bundle_dir, protocol.META_FILE), encoding="utf-8") as fh:
            meta = json.load(fh)
        check_environment(meta)
        cloudpickle = _load_cloudpickle(meta.get("cloudpickle_version", ""))
        advice = check_cloudpickle(meta, cloudpickle)
        try:
            with open(os.path.join(bundle_dir, protocol.PAYLOAD_FILE), "rb") as fh:
                payload = cloudpickle.load(fh)
        except Exception as exc:
            if advice:
                raise StepEnvironmentError(f"{advice}; loading the step failed: {type(exc).__name__}: {exc}") from exc
            raise
        args = _resolve_refs(list(payload["args"]), refs, cloudpickle)
        kwargs = _resolve_refs(dict(payload["kwargs"]), refs, cloudpickle)
    except BaseException as exc:
        _write_json(os.path.join(output_dir, protocol.ERROR_FILE), {**base, "phase": "load", **_error_record(exc)})
        print(f"[stepops] cannot start step: {_qualname(exc)}: {exc}", file=sys.stderr, flush=True)
        return 2

    print(f"[stepops] running {meta.get('task_label', 'step')} on {base['host']} (Python {base['python']})", flush=True)
    try:
        value = payload["callable"](*args, **kwargs)
        outputs = write_result(value, output_dir, meta, cloudpickle)
    except BaseException as raised:
        error = _explain_memory_error(raised)
        sys.stdout.flush()
        traceback.print_exception(type(error), error, error.__traceback__)
        sys.stderr.flush()
        _write_json(os.path.join(output_dir, protocol.ERROR_FILE), {**base, "phase": "run", **_error_record(error)})
        return 1
    sys.stdout.flush()
    sys.stderr.flush()
    _write_json(
        os.path.join(output_dir, protocol.RESULT_FILE),
        {**base, "multiple_outputs": bool(meta.get("multiple_outputs")), "outputs": outputs,
         "duration_seconds": round(time.time() - started, 3)},
    )
    print(f"[stepops] step finished in {time.time() - started:.2f}s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--ref", action="append", default=[], help="INDEX=PATH of a staged input artifact")
    ns = parser.parse_args(argv)
    refs = {}
    for item in ns.ref:
        index, _, path = item.partition("=")
        refs[int(index)] = path
    return run(ns.bundle, ns.output, refs)


if __name__ == "__main__":
    sys.exit(main())
