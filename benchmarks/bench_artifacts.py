"""Artifacts budget: a 1 GiB array passes between steps at >= 0.8x of ``cp``, never two copies in RAM.

On the local (``file://``) store under the system temp directory:

- baseline: ``cp`` of the 1 GiB result file on the same filesystem, timed right before every measured
  operation (after one untimed warm-up copy), so load drifts hit both sides;
- write: the runtime's result path, ``bootstrap.write_result`` (cloudpickle streamed to the file
  through the sha256-hashing writer), in a process without Airflow, as on the remote side;
- read: ``ArtifactRef.load()`` (sha256 verified, then unpickled) as a normal task does, and the
  runtime's input path (``open`` + ``cloudpickle.load``) as a downstream step does;
- floors and what-ifs (not the package's code): reading the file into a fresh buffer, writing with
  the hash computed in a second thread, loading with the hash computed while unpickling.

Peak memory is the kernel's high-water mark (VmHWM, reset before each operation), reported as
"copies": (peak RSS - RSS before the payload existed) / payload size.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import (
    MIB,
    Section,
    airflow_env,
    budget_check,
    emit,
    fmt_bytes,
    fmt_rate,
    fmt_time,
    median,
    peak_rss_bytes,
    plain_env,
    progress,
    ratio,
    reset_peak_rss,
    rss_bytes,
    run_worker,
)

BUDGET = 0.8
CHUNK = 8 * MIB
META = {"multiple_outputs": False, "inline_result_max_bytes": 48 * 1024, "max_result_bytes": 1 << 50}


# ---- payloads and what-if I/O (worker side) ----------------------------------------------------
def numpy_available() -> bool:
    """Whether numpy can be imported in this interpreter."""
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False
    return True


def make_payload(size: int, kind: str) -> Any:
    """``size`` bytes of incompressible data as a numpy uint8 array or a bytearray."""
    block = os.urandom(MIB)
    data = bytearray(block) * (size // MIB)
    data += block[: size % MIB]
    if kind == "numpy":
        import numpy as np

        return np.frombuffer(data, dtype=np.uint8)
    return data


def payload_len(value: Any) -> int:
    """Size in bytes of a loaded payload."""
    return int(getattr(value, "nbytes", None) or len(value))


class _ThreadHash:
    """sha256 of what passes through the open binary file ``fh``, updated in a second thread, in order."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self.sha256 = hashlib.sha256()
        self._pool = ThreadPoolExecutor(1)
        self._pending: Future[None] | None = None

    def _sync(self) -> None:
        """Wait for the pending hash update, keeping updates in order."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None


class OverlappedHashingWriter(_ThreadHash, io.RawIOBase):
    """What-if: like the runtime's hashing writer, but sha256 runs in a thread while the file is written."""

    def writable(self) -> bool:
        """Raw writers must say so."""
        return True

    def write(self, data: Any) -> int:  # type: ignore[override]
        """Write ``data`` in chunks, hashing each chunk in the thread while the next is written."""
        view = memoryview(data).cast("B")
        for offset in range(0, view.nbytes, CHUNK):
            part = view[offset:offset + CHUNK]
            self._sync()
            self._pending = self._pool.submit(self.sha256.update, part)
            self._fh.write(part)
        self._sync()  # the caller may reuse its buffer once we return
        return view.nbytes

    def finish(self) -> str:
        """Return the hex digest (all updates are done when ``write`` returns)."""
        self._pool.shutdown()
        return self.sha256.hexdigest()


class HashingReader(_ThreadHash):
    """What-if: a file wrapper for ``cloudpickle.load`` that hashes what it reads, in a second thread."""

    def read(self, n: int = -1) -> bytes:
        """Read and hash ``n`` bytes."""
        data = self._fh.read(n)
        self._sync()
        self.sha256.update(data)
        return data

    def readline(self) -> bytes:
        """Read and hash one line (pickle opcodes use it)."""
        data = self._fh.readline()
        self._sync()
        self.sha256.update(data)
        return data

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` chunk by chunk, hashing each chunk in the thread while the next is read."""
        view = memoryview(buffer).cast("B")
        total = 0
        while total < view.nbytes:
            got = self._fh.readinto(view[total:total + CHUNK])
            if not got:
                break
            self._sync()
            self._pending = self._pool.submit(self.sha256.update, view[total:total + got])
            total += got
        self._sync()
        return total

    def finish(self) -> str:
        """Hash what is left unread (nothing, for a whole pickle) and return the hex digest."""
        self._sync()
        self.sha256.update(self._fh.read())
        self._pool.shutdown()
        return self.sha256.hexdigest()


def _cp_command(src: Path, dst: Path) -> list[str]:
    """``cp`` that really copies the data (no reflink) where GNU cp supports it."""
    help_text = subprocess.run(["cp", "--help"], capture_output=True, text=True, check=False).stdout
    return ["cp", "--reflink=never", str(src), str(dst)] if "--reflink" in help_text else ["cp", str(src), str(dst)]


def time_cp(src: Path) -> float:
    """One timed ``cp`` of ``src`` next to itself; the copy is deleted."""
    dst = src.with_name("cp-copy.bin")
    cmd = _cp_command(src, dst)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    dst.unlink()
    return seconds


def _measured(fn: Any) -> tuple[Any, float, int]:
    """Run ``fn`` with the peak-RSS counter reset; return (result, seconds, peak RSS)."""
    gc.collect()
    reset_peak_rss()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    return result, seconds, peak_rss_bytes()


def write_worker(out_dir: Path, size: int, kind: str, reps: int) -> dict[str, Any]:
    """Time ``bootstrap.write_result`` of a fresh payload (no Airflow here), each run next to a ``cp``."""
    import cloudpickle

    from airflow_stepops.runtime import bootstrap

    rss_start = rss_bytes()
    payload = make_payload(size, kind)
    rss_payload = rss_bytes()
    kept = out_dir / "result"
    kept.mkdir(parents=True)
    entry = bootstrap.write_result(payload, str(kept), META, cloudpickle)["return_value"]  # untimed warm-up
    source = kept / entry["path"]
    time_cp(source)  # untimed warm-up
    runs, cps = [], []
    for rep in range(reps):
        target = out_dir / f"write-{rep}"
        target.mkdir()
        cps.append(time_cp(source))
        outputs, seconds, peak = _measured(lambda t=target: bootstrap.write_result(payload, str(t), META, cloudpickle))
        if outputs["return_value"]["sha256"] != entry["sha256"]:
            raise RuntimeError("write_result produced a different sha256 for the same payload")
        runs.append({"seconds": seconds, "peak_rss": peak})
        shutil.rmtree(target)
    whatif_path = out_dir / "whatif.pkl"

    def overlapped() -> str:
        """write_result's pickling, with the what-if hashing writer."""
        with open(whatif_path, "wb") as fh:
            writer = OverlappedHashingWriter(fh)
            buffered = io.BufferedWriter(writer, buffer_size=MIB)
            cloudpickle.dump(payload, buffered, protocol=5)
            buffered.flush()
            return writer.finish()

    cps.append(time_cp(source))
    digest, whatif_seconds, _ = _measured(overlapped)
    whatif_path.unlink()
    return {"rss_start": rss_start, "rss_payload": rss_payload, "runs": runs, "cp": cps,
            "whatif_overlapped": whatif_seconds, "whatif_digest_ok": digest == entry["sha256"], "path": str(source),
            "size": entry["size"], "sha256": entry["sha256"], "type": entry["type"]}


def read_worker(path: Path, size: int, file_size: int, type_name: str, sha256: str, reps: int) -> dict[str, Any]:
    """Time ``ArtifactRef.load()``, the runtime's input path, a raw read and a single-pass what-if."""
    import cloudpickle

    from airflow_stepops.artifacts import ArtifactRef
    from airflow_stepops.runtime import bootstrap, protocol

    ref = ArtifactRef(uri=f"file://{path}", type=type_name, size=file_size, sha256=sha256)

    def measure(fn: Any, expected: int = size) -> dict[str, float]:
        """Time ``fn`` and check what it returned; peak RSS increase included."""
        before = rss_bytes()
        value, seconds, peak = _measured(fn)
        if payload_len(value) != expected:
            raise RuntimeError(f"loaded {payload_len(value)} bytes, expected {expected}")
        del value
        return {"seconds": seconds, "peak_increase": peak - before}

    def raw_read() -> bytes:
        """Floor: the whole file into one fresh bytes object."""
        with open(path, "rb") as fh:
            return fh.read()

    def runtime_input() -> Any:
        """What a downstream step does with a staged input artifact."""
        return bootstrap._resolve_refs([{protocol.REF_MARKER: 0}], {0: str(path)}, cloudpickle)[0]

    def single_pass() -> Any:
        """What-if: unpickle and verify the sha256 in one pass."""
        with open(path, "rb") as fh:
            reader = HashingReader(fh)
            value = cloudpickle.load(reader)
            if reader.finish() != sha256:
                raise ValueError("sha256 mismatch")
        return value

    out: dict[str, Any] = {"load": [], "runtime": [], "raw": [], "whatif_single_pass": [], "cp": []}
    measure(raw_read, file_size)  # untimed warm-up: page cache and allocator
    plan = [("load", ref.load, size), ("runtime", runtime_input, size)] * reps
    plan += [("raw", raw_read, file_size), ("whatif_single_pass", single_pass, size)]
    for name, fn, expected in plan:
        out["cp"].append(time_cp(path))
        out[name].append(measure(fn, expected))
    return out


# ---- orchestrator side ------------------------------------------------------------------------
def time_stream_copy(src: Path) -> float:
    """Copy the file through user space in 8 MiB chunks (cp without the kernel's copy offload)."""
    dst = src.with_name("stream-copy.bin")
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    t0 = time.perf_counter()
    with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
        while got := fin.readinto(buffer):
            fout.write(view[:got])
    seconds = time.perf_counter() - t0
    dst.unlink()
    return seconds


def _mem_available() -> int | None:
    """MemAvailable from /proc/meminfo, None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run(workdir: Path, *, size: int, quick: bool = False) -> Section:
    """Run the artifacts benchmark and build its table."""
    kind = "numpy" if numpy_available() else "bytearray"
    section = Section("artifacts", f"{fmt_bytes(size)} {kind} result through the local file:// store vs cp")
    root = workdir / "artifacts"
    root.mkdir(parents=True, exist_ok=True)
    free_disk = shutil.disk_usage(root).free
    available = _mem_available()
    if free_disk < 2.2 * size:
        raise RuntimeError(f"needs {fmt_bytes(2.2 * size)} free under {root}, has {fmt_bytes(free_disk)}; use --size")
    if available is not None and available < 3 * size:
        raise RuntimeError(f"needs ~{fmt_bytes(3 * size)} of free memory, has {fmt_bytes(available)}; use --size")
    reps = 1 if quick else 2
    try:
        progress(f"artifacts: writing a {fmt_bytes(size)} {kind} result with bootstrap.write_result x{reps}")
        written = run_worker("benchmarks.bench_artifacts", ["write", root, size, kind, reps], env=plain_env())
        result_file = Path(written["path"])
        stream = time_stream_copy(result_file)
        progress(f"artifacts: ArtifactRef.load() and the runtime's input path x{reps}")
        read = run_worker("benchmarks.bench_artifacts",
                          ["read", result_file, size, written["size"], written["type"], written["sha256"], reps],
                          env=airflow_env(workdir / "airflow-home-artifacts"))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    nbytes = written["size"]
    cp = written["cp"] + read["cp"]
    t_cp = median(cp)
    t_write = median(r["seconds"] for r in written["runs"])
    t_load = median(r["seconds"] for r in read["load"])
    t_runtime = median(r["seconds"] for r in read["runtime"])
    t_raw = median(r["seconds"] for r in read["raw"])

    section.add(f"cp (baseline, median of {len(cp)}, one before each operation)", fmt_rate(nbytes, t_cp))
    section.add("  user-space copy, 8 MiB chunks (cp without copy offload)", fmt_rate(nbytes, stream),
                fmt_rate(nbytes, t_cp), ratio(t_cp, stream))
    for label, seconds in (("step -> step: write_result + runtime read", t_write + t_runtime),
                           ("step -> task: write_result + ArtifactRef.load()", t_write + t_load)):
        r = ratio(t_cp, seconds)
        section.add(label, fmt_rate(nbytes, seconds), fmt_rate(nbytes, t_cp), r, f">= {BUDGET:.2f}x",
                    budget_check(r, BUDGET, at_most=False))
    section.add("  write_result (cloudpickle + sha256 -> file)", fmt_rate(nbytes, t_write), fmt_rate(nbytes, t_cp),
                ratio(t_cp, t_write))
    section.add("  ArtifactRef.load() (verify sha256, then unpickle)", fmt_rate(nbytes, t_load),
                fmt_rate(nbytes, t_cp), ratio(t_cp, t_load))
    section.add("  runtime input read (open + cloudpickle.load)", fmt_rate(nbytes, t_runtime),
                fmt_rate(nbytes, t_cp), ratio(t_cp, t_runtime))
    section.add("  floor: read the file into a fresh buffer", fmt_rate(nbytes, t_raw), fmt_rate(nbytes, t_cp),
                ratio(t_cp, t_raw))
    section.add("  what-if: write_result hashing in a 2nd thread", fmt_rate(nbytes, written["whatif_overlapped"]),
                fmt_rate(nbytes, t_cp), ratio(t_cp, written["whatif_overlapped"]))
    t_single = median(r["seconds"] for r in read["whatif_single_pass"])
    section.add("  what-if: load hashing while unpickling (1 pass)", fmt_rate(nbytes, t_single),
                fmt_rate(nbytes, t_cp), ratio(t_cp, t_single))

    write_copies = max((r["peak_rss"] - written["rss_start"]) / size for r in written["runs"])
    load_copies = max(r["peak_increase"] for r in read["load"]) / size
    runtime_copies = max(r["peak_increase"] for r in read["runtime"]) / size
    for label, copies in (("payload copies in RAM at peak: write_result", write_copies),
                          ("payload copies in RAM at peak: ArtifactRef.load()", load_copies),
                          ("payload copies in RAM at peak: runtime input read", runtime_copies)):
        section.add(label, f"{copies:.2f}", "1.00", copies, "< 2 copies", copies < 1.5)
    section.notes += [
        f"payload: {kind} of {fmt_bytes(size)} (numpy is {'available' if kind == 'numpy' else 'not installed'} in "
        f"this interpreter); pickle file {fmt_bytes(nbytes)}; store and cp on the filesystem of {workdir}.",
        "ratios are throughput ratios (cp time / operation time); higher is better. The page cache is warm for "
        "every operation (the file was just written); files are deleted afterwards.",
        f"median times: cp {fmt_time(t_cp)} (samples {fmt_time(min(cp))} to {fmt_time(max(cp))}), user-space copy "
        f"{fmt_time(stream)}, write_result {fmt_time(t_write)}, ArtifactRef.load {fmt_time(t_load)}, runtime read "
        f"{fmt_time(t_runtime)}, raw read {fmt_time(t_raw)}.",
        "write_result copies include the payload itself (the step's return value is in memory by definition).",
        f"what-if overlapped write digest matched the runtime's: {written['whatif_digest_ok']}.",
    ]
    section.data = {"kind": kind, "size": size, "cp": cp, "stream_copy": stream, "write": written, "read": read}
    return section


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "write":
        emit(write_worker(Path(rest[0]), int(rest[1]), rest[2], int(rest[3])))
    elif mode == "read":
        emit(read_worker(Path(rest[0]), int(rest[1]), int(rest[2]), rest[3], rest[4], int(rest[5])))
    else:
        print(json.dumps({"error": f"unknown mode {mode}"}))
        sys.exit(2)
