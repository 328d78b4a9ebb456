"""The program every remote job runs: unpack the bundle, run the step, ship the output back.

Kubernetes starts it as ``python -c <program>`` (``bundle.entry_program()``: nothing is beside it there), SageMaker,
Vertex and Azure ML as ``entry.py`` staged beside the bundle, Modal through ``run_step`` below. The bundle
(``protocol.Env`` names every variable) arrives in the pod spec itself (``BUNDLE_PARTS`` variables of base64
gzip-tar), from a mounted volume (``BUNDLE_PATH``) or, when too large for the spec, from a ``file://`` artifact
store the pod shares with the workers (``BUNDLE_URI``, e.g. an NFS or hostPath mount at the same path). The output
goes to a mounted volume (``OUTPUT_PATH``), else, when small, back through the container's termination message,
which does not depend on the pod log: the kubelet rotates logs (``containerLogMaxSize``) and serves only the
current file, but keeps the message in the pod status. The message's last line is the output record
``<prefix>data:<sha256>:<base64 archive>`` when the archive fits; a larger one is printed at the end of the pod
log between markers and the record is ``<prefix>log:<sha256>:<size>``, so a block a rotation cut is detected,
never taken. Outputs over the inline limit are copied to the shared ``OUTPUT_URI``.

SageMaker keeps, of a failed job, the first 1024 characters of its failure file (``FAILURE_FILE``) as
``FailureReason`` ("If training fails ... SageMaker returns the first 1024 characters from this file as
FailureReason", https://docs.aws.amazon.com/sagemaker/latest/dg/your-algorithms-training-algo-output.html); what
it uploads of ``/opt/ml/model`` for a failed job is not documented, so the step's error record travels in that
file: a readable first line, then ``FAILURE_MARKER`` and the record as base64 zlib JSON (the zlib checksum tells
a cut record from a whole one), its traceback shortened from the top until it fits.

Stdlib-only like ``bootstrap.py``. Exit code: the step's (0 success, 1 the step raised, 2 bad bundle), or 3 when
the output could not be shipped.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zlib

if __name__.startswith("airflow_stepops."):  # imported on the worker
    from airflow_stepops.runtime import protocol
else:  # a job: protocol.py is beside this file, or inlined before it
    import protocol  # type: ignore[import-not-found,no-redef]

Env = protocol.Env
#: every line of the output block carries this prefix; lines without it are never part of the data
PREFIX = protocol.OUTPUT_PREFIX
LINE_CHARS = 8192  # well under the 16 KiB at which container runtimes split log lines
#: the kubelet keeps the last 4096 bytes of a termination message; the record may use all but the
#: summary line's share (https://kubernetes.io/docs/tasks/debug/debug-application/determine-reason-pod-failure/)
MESSAGE_BYTES = 4096
RECORD_BYTES = MESSAGE_BYTES - 512
#: characters of the failure file SageMaker keeps (1024), less room for its "AlgorithmError: " prefix
#: and ", exit code: N" suffix
FAILURE_BUDGET = 960
#: the most of a failing step's error.json a Modal call's exception carries (Modal cuts exception texts near 2 MiB)
MAX_CALL_ERROR_BYTES = 64 * 1024


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
    marker = _env(Env.BUNDLE_URI).rstrip("/") + "/" + protocol.META_FILE
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
    parts = int(_env(Env.BUNDLE_PARTS, "0") or 0)
    if parts:
        data = "".join(_env(f"{Env.BUNDLE}_{index}") for index in range(parts))
        archive = base64.b64decode(data)
        if hashlib.sha256(archive).hexdigest() != _env(Env.BUNDLE_SHA256):
            raise RuntimeError("the inline bundle is damaged (sha256 mismatch)")
        bundle = os.path.join(workdir, "bundle")
        os.makedirs(bundle)
        _extract(archive, bundle)
        return bundle
    if _env(Env.BUNDLE_PATH):
        return _env(Env.BUNDLE_PATH)
    uri = _env(Env.BUNDLE_URI).rstrip("/")
    bundle = os.path.join(workdir, "bundle")
    os.makedirs(bundle)
    for name in protocol.BUNDLE_FILES:
        _fetch(f"{uri}/{name}", os.path.join(bundle, name))
    return bundle


def stage_refs(bundle: str, workdir: str) -> list[str]:
    """``--ref INDEX=PATH`` arguments: inline in the bundle, on a mounted volume, or fetched."""
    argv: list[str] = []
    refs_file = _env(Env.REFS_FILE)
    if refs_file:  # where the environment is small (SageMaker: 512 characters a value)
        with open(refs_file, encoding="utf-8") as fh:
            listed = json.load(fh)
    else:
        listed = json.loads(_env(Env.REFS, "{}"))
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


#: pip without prompts, without its warning about running as root (images often do) and without looking for a
#: newer pip (https://pip.pypa.io/en/stable/topics/configuration/#environment-variables)
PIP_ENV = {"PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_ROOT_USER_ACTION": "ignore"}


class InstallError(Exception):
    """The step's requirements could not be installed."""


def _cloudpickle_to_install(want: str) -> str:
    """``cloudpickle==<the workers'>`` when this interpreter has none (a plain Python image) or another minor version
    (a framework image's own), whose pickles the bootstrap would refuse; else ""."""
    if not want:
        return ""
    try:
        have = importlib.metadata.version("cloudpickle")
    except importlib.metadata.PackageNotFoundError:
        print(f"[stepops] the image has no cloudpickle: installing the workers' cloudpickle {want}", flush=True)
        return f"cloudpickle=={want}"
    if have.split(".")[:2] == want.split(".")[:2]:
        return ""
    print(f"[stepops] the image has cloudpickle {have}, the workers {want}: installing cloudpickle {want} for the "
          "step", flush=True)
    return f"cloudpickle=={want}"


def _cache_key(*texts: str) -> str:
    """Installed packages are reusable by a job with the same requirements on the same Python, platform and C
    library (wheels built for glibc do not load on musl, nor on an older glibc)."""
    where = f"{sys.implementation.cache_tag}|{sysconfig.get_platform()}|{'-'.join(platform.libc_ver())}"
    return hashlib.sha256("|".join((where, *texts)).encode()).hexdigest()[:24]


def install_requirements(bundle: str, workdir: str) -> str | None:
    """Install what the step needs into a directory put first on its ``sys.path`` (``None``: nothing to install):
    its requirements, and the workers' cloudpickle where the image's cannot load the step (a separate install:
    a requirements file in hash-checking mode must not meet an unhashed line). From the cache directory
    (``Env.REQUIREMENTS_CACHE``) when an earlier job left the same install there."""
    with open(os.path.join(bundle, protocol.META_FILE), encoding="utf-8") as fh:
        meta = json.load(fh)
    if list(meta.get("python_version", [])[:2]) != list(sys.version_info[:2]):
        return None  # the bootstrap refuses this interpreter, naming the Python to use: installing is no use
    requirements = str(meta.get("requirements") or "").strip()
    cloudpickle = _cloudpickle_to_install(str(meta.get("cloudpickle_version") or ""))
    if cloudpickle and not requirements and importlib.util.find_spec("pip") is None:
        cloudpickle = ""  # nothing can install it: the bootstrap names the cloudpickle to put in the image
    if not (requirements or cloudpickle):
        return None
    started, target = time.monotonic(), os.path.join(workdir, "site")
    cache = _env(Env.REQUIREMENTS_CACHE)
    cached = os.path.join(cache, _cache_key(requirements, cloudpickle) + ".tar.gz") if cache else ""
    if cached and _reuse(cached, target):
        print(f"[stepops] requirements: reused the install cached at {cached} "
              f"({time.monotonic() - started:.1f} s)", flush=True)
        return target
    if requirements:
        _pip_install(["-r", _listing(requirements, workdir)], protocol.masked(requirements).splitlines(), target)
    if cloudpickle:
        _pip_install(["--no-deps", cloudpickle], [cloudpickle], target)
    print(f"[stepops] requirements: installed in {time.monotonic() - started:.1f} s", flush=True)
    if cached:
        _keep(target, cached)
    return target


def _listing(requirements: str, workdir: str) -> str:
    path = os.path.join(workdir, "requirements.txt")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(requirements + "\n")
    return path


def _reuse(cached: str, target: str) -> bool:
    """Unpack a cached install; one that cannot be read (cut, corrupt) is set aside and installed afresh."""
    if not os.path.exists(cached):
        return False
    try:
        with tarfile.open(cached, mode="r:gz") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(target, filter="data")
            else:  # Python without extraction filters; the archive is our own
                tar.extractall(target)
        return True
    except Exception as exc:
        print(f"[stepops] requirements: the cached install {cached} cannot be read ({exc}); installing afresh",
              file=sys.stderr, flush=True)
        shutil.rmtree(target, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.remove(cached)
        return False


def _pip_install(args: list[str], shown: list[str], target: str) -> None:
    """``pip install --target``, its output streamed to the log as it comes; InstallError naming what failed."""
    if importlib.util.find_spec("pip") is None:
        raise InstallError(f"{sys.executable} (Python {sys.version.split()[0]}) has no pip, so the step's "
                           "requirements cannot be installed; use an image with pip (e.g. the default image: leave "
                           "\"image\" unset), or install the requirements into the image")
    print(f"[stepops] requirements: pip install --target <site>: {'; '.join(x for x in shown if x.strip())}",
          flush=True)
    tail: collections.deque[str] = collections.deque(maxlen=12)
    child = subprocess.Popen([sys.executable, "-m", "pip", "install", "--target", target, *args],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                             env={**os.environ, **PIP_ENV})
    assert child.stdout is not None
    for line in child.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        tail.append(line.rstrip())
    code = child.wait()
    if code:
        raise InstallError(f"pip could not install the step's requirements (exit code {code}); its last lines:\n"
                           + "\n".join(tail))


def _keep(target: str, cached: str) -> None:
    """Leave the install for the next job, streamed to a file of this job's own and renamed whole: a job reading
    the cache never sees half an archive. A cache that cannot be written only costs the next job an install."""
    partial = ""
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=os.path.dirname(cached), prefix=".install-", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w:gz", compresslevel=1) as tar:
            for name in sorted(os.listdir(target)):
                tar.add(os.path.join(target, name), arcname=name)
        os.replace(partial, cached)
        print(f"[stepops] requirements: cached at {cached} for later jobs", flush=True)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(partial)
        print(f"[stepops] requirements: cannot cache the install at {cached}: {exc}", file=sys.stderr, flush=True)


def run_child(argv: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``argv``; SIGTERM/SIGINT (the kubelet or Modal stopping the container) are passed on so the step can
    clean up or checkpoint."""
    child = subprocess.Popen(argv, env=env)
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[signum] = signal.signal(signum, lambda number, _frame: child.send_signal(number))
        except ValueError:  # not the main thread: the signal reaches the child's process group anyway
            pass
    try:
        code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
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
    """Copy the output directory to the shared store; the outcome file last (it marks completion)."""
    target = _shared_path(uri)
    os.makedirs(target, exist_ok=True)
    for name in sorted(os.listdir(directory), key=lambda n: n in protocol.OUTCOME_FILES):
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
    limit = int(_env(Env.INLINE_MAX_BYTES, "524288"))
    raw = sum(os.path.getsize(os.path.join(output, n)) for n in os.listdir(output))
    record = output_record(_archive(output), marker, limit) if raw <= 8 * limit else None
    if record is not None:
        return record
    upload(output, _env(Env.OUTPUT_URI))
    print(f"[stepops] output of {raw} bytes written to {_env(Env.OUTPUT_URI)}", flush=True)
    return ""


def _failure_record(message: str) -> dict:
    return {"type": protocol.FAILED_TYPE, "message": message, "traceback": "", "phase": "transfer"}


def summary(output: str, code: int) -> str:
    """The step's error for ``kubectl describe`` and the failure message (instead of the last log lines)."""
    try:
        with open(os.path.join(output, protocol.ERROR_FILE), encoding="utf-8") as fh:
            error = json.load(fh)
        return f"{error.get('type', 'error')}: {error.get('message', '')}"
    except (OSError, ValueError):
        return f"the step exited with code {code}"


def write_termination_message(text: str, record: str = "") -> None:
    """``text`` cut to fit, then the output record as the last line, within the kubelet's 4096 bytes."""
    path = _env(Env.TERMINATION_LOG)
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
    for name, code in zip(protocol.OUTCOME_FILES, (0, 1)):
        if os.path.exists(os.path.join(output, name)):
            print(f"[stepops] {name} of this try is already in {output}: the worker was restarted after the "
                  "step finished; not running it again", flush=True)
            return code
    return None


def prepare_checkpoint_dir() -> None:
    """Create ``STEPOPS_CHECKPOINT_DIR`` as the step's own user, so the step can write it at once (on Kubernetes
    only the claim is mounted: a directory the kubelet made for a subPath would belong to root). A step that
    does not checkpoint must not fail for it, so a failure is only reported."""
    path = _env(Env.CHECKPOINT_DIR)
    if not path:
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        print(f"[stepops] cannot create {Env.CHECKPOINT_DIR} {path}: {exc}", file=sys.stderr, flush=True)


def error_record(output: str, code: int) -> dict:
    """The step's error record, or one that says how the step exited."""
    try:
        with open(os.path.join(output, protocol.ERROR_FILE), encoding="utf-8") as fh:
            return dict(json.load(fh))
    except (OSError, ValueError):
        return _failure_record(f"the step exited with code {code}")


def encode_failure(error: dict, budget: int = FAILURE_BUDGET) -> str:
    """SageMaker's failure file for the error record ``error``, at most ``budget`` characters."""
    error = {k: error.get(k, "") for k in ("type", "message", "traceback", "phase")}
    lines = str(error["traceback"]).splitlines(keepends=True)
    while True:
        headline = f"{str(error['type']).rsplit('.', 1)[-1]}: {error['message']}".splitlines()[0][:160] + "\n"
        packed = base64.b64encode(zlib.compress(json.dumps(error).encode(), 9)).decode()
        text = headline + protocol.FAILURE_MARKER + packed
        if len(text) <= budget:
            return text
        if len(lines) > 1:  # the innermost frames (the end of a traceback) tell the most
            lines = lines[max(1, len(lines) // 4):]
            error["traceback"] = "...\n" + "".join(lines)
        elif error["traceback"]:
            error["traceback"] = ""
        elif not error["message"]:
            return text[:budget]
        else:
            error["message"] = str(error["message"])[: max(0, len(str(error["message"])) * 3 // 4 - 1)]


def call_error(output: str, code: int) -> str:
    """The exception text of a failed Modal call: a summary, then the error record after ``CALL_ERROR_MARKER``
    (the worker reads it without unpickling anything)."""
    error = error_record(output, code)
    raw = json.dumps(error).encode()
    if len(raw) > MAX_CALL_ERROR_BYTES:  # keep the end of the traceback: where it failed
        error["message"] = str(error.get("message", ""))[:8000]
        error["traceback"] = "...\n" + str(error.get("traceback", ""))[-(MAX_CALL_ERROR_BYTES // 2):]
        raw = json.dumps(error).encode()
    summary = f"{error.get('type', 'Exception')}: {error.get('message', '')}"[:2000]
    return f"{summary} [{protocol.CALL_ERROR_MARKER}{base64.b64encode(raw).decode()}]"


def run(marker: str) -> int:
    if _env(Env.OUTPUT_PATH):
        done = finished_before(_env(Env.OUTPUT_PATH))
        if done is not None:
            return done
    prepare_checkpoint_dir()
    workdir = tempfile.mkdtemp(prefix="stepops-")
    output = _env(Env.OUTPUT_PATH) or os.path.join(workdir, "output")
    os.makedirs(output, exist_ok=True)
    try:
        bundle = stage_bundle(workdir)
        refs = stage_refs(bundle, workdir)
        site = install_requirements(bundle, workdir)
    except InstallError as exc:
        print(f"[stepops] {exc}", file=sys.stderr, flush=True)
        with open(os.path.join(output, protocol.ERROR_FILE), "w", encoding="utf-8") as fh:
            json.dump({"type": protocol.REQUIREMENTS_TYPE, "message": str(exc), "traceback": "",
                       "phase": "install"}, fh)
        code = 2
    except Exception as exc:
        print(f"[stepops] cannot stage the step: {exc}", file=sys.stderr, flush=True)
        with open(os.path.join(output, protocol.ERROR_FILE), "w", encoding="utf-8") as fh:
            json.dump({**_failure_record(f"cannot stage the step bundle: {exc}"), "phase": "load"}, fh)
        code = 2
    else:
        env = None
        if site:  # first on the step's sys.path, before the image's own packages
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [site, _env("PYTHONPATH")]))}
        code = run_child([sys.executable, os.path.join(bundle, protocol.BOOTSTRAP_FILE), "--bundle", bundle,
                          "--output", output, *refs], env)
    sys.stdout.flush()
    sys.stderr.flush()
    if _env(Env.OUTPUT_PATH):
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
        with open(os.path.join(failed, protocol.ERROR_FILE), "w", encoding="utf-8") as fh:
            json.dump(_failure_record(f"the step finished (exit code {code}) but its output could not be "
                                      f"shipped: {exc}"), fh)
        code, text, record = 3, summary(failed, 3), output_record(_archive(failed), marker, 1 << 20) or ""
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_termination_message(text, record)
    return code


def main() -> int:
    code = run(_env(Env.MARKER, "step"))
    if code and _env(Env.FAILURE_FILE):
        try:
            with open(_env(Env.FAILURE_FILE), "w", encoding="utf-8") as fh:
                fh.write(encode_failure(error_record(_env(Env.OUTPUT_PATH), code)))
        except OSError:
            pass  # SageMaker then reports the last log lines
    return code


def run_step(archive: bytes, env: dict[str, str]) -> bytes:
    """Modal's function (pickled by value with this module and ``protocol``: images need no airflow_stepops). Its
    argument is the bundle as gzip-tar (with this file and the inputs), its return value the output directory as
    gzip-tar; Modal moves both through its blob store when large. The step runs in a child ``entry.py``, so its
    prints reach Modal's logs as they happen; a failing step fails the call (Modal shows it failed) with a
    ``RuntimeError`` whose text is ``call_error``."""
    with tempfile.TemporaryDirectory(prefix="stepops-") as work:
        bundle, output = os.path.join(work, "bundle"), os.path.join(work, "output")
        os.makedirs(bundle)
        os.makedirs(output)
        _extract(archive, bundle)
        code = run_child([sys.executable, os.path.join(bundle, protocol.ENTRY_FILE)],
                         {**os.environ, **env, Env.BUNDLE_PATH: bundle, Env.OUTPUT_PATH: output,
                          "PYTHONUNBUFFERED": "1"})
        print(f"[stepops] step finished with exit code {code}", flush=True)
        if code:
            raise RuntimeError(call_error(output, code))
        return _archive(output)


if __name__ == "__main__":
    sys.exit(main())
