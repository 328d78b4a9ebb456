"""Step bundles (callable + arguments + metadata) and the result protocol, worker side.

Layout under the artifact store, one directory per try so a retry never overwrites what an
earlier try's job may still be reading::

    <store>/<dag_id>/<run_id>/<task_id>/<map_index>/try-<n>-<run key>/{bundle,output}/

with the files ``runtime/protocol.py`` names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from airflow_stepops.artifacts import CHUNK, ArtifactRef, store_path
from airflow_stepops.exceptions import StepOperatorConfigError
from airflow_stepops.runtime import protocol

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

RUNTIME_DIR = Path(protocol.__file__).parent
_UNSAFE = re.compile(r"[^A-Za-z0-9._:+=-]")


def _path_component(part: str) -> str:
    """A safe, collision-free directory name: readable when the id is already safe."""
    safe = _UNSAFE.sub("_", part)
    if safe != part or safe in (".", ".."):
        safe = f"{safe.strip('.') or '_'}-{hashlib.sha256(part.encode()).hexdigest()[:8]}"
    return safe


@dataclass(frozen=True)
class StepIdentity:
    """Who a job belongs to; every backend derives its deterministic job name from this."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    try_number: int
    #: unique to one incarnation of the dag run (the operator keeps it in the task state store): job names
    #: are permanent on some services, and a run re-created with the same run_id must not meet old jobs
    run_key: str = ""
    #: the attempt within the try: a preempted job, or one on a step operator without capacity, is followed by a
    #: new job of the next attempt (names and directories of attempt 1 carry no attempt)
    attempt: int = 1

    @classmethod
    def from_context(cls, context: Any, run_key: str = "") -> StepIdentity:
        ti = context["ti"]
        map_index = getattr(ti, "map_index", -1)
        return cls(ti.dag_id, ti.run_id, ti.task_id, -1 if map_index is None else map_index, ti.try_number, run_key)

    def for_try(self, try_number: int) -> StepIdentity:
        return replace(self, try_number=try_number, attempt=1)

    def with_attempt(self, attempt: int) -> StepIdentity:
        return replace(self, attempt=attempt)

    @property
    def digest(self) -> str:
        parts: list[Any] = [self.dag_id, self.run_id, self.task_id, self.map_index, self.try_number, self.run_key]
        raw = json.dumps([*parts, self.attempt] if self.attempt > 1 else parts)
        return hashlib.sha256(raw.encode()).hexdigest()

    def job_name(self, max_length: int = 63, allowed: str = r"[^a-z0-9-]") -> str:
        """Readable, deterministic name: ``<dag>-<task>-<map>-t<try>-<hash>`` cut to ``max_length``."""
        attempt = f"a{self.attempt}" if self.attempt > 1 else ""
        suffix = f"-m{self.map_index}-t{self.try_number}{attempt}-{self.digest[:10]}" if self.map_index >= 0 else (
            f"-t{self.try_number}{attempt}-{self.digest[:10]}"
        )
        stem = re.sub(allowed, "-", f"{self.dag_id}-{self.task_id}".lower()).strip("-") or "step"
        stem = re.sub("-+", "-", stem)[: max_length - len(suffix)].rstrip("-")
        return f"{stem}{suffix}"

    def step_path(self, root: str) -> str:
        """``<root>/<dag>/<run>/<task>/<map index>[/run-<run key>]``: one directory for every try of one task
        instance of one incarnation of its run, so a retry finds what an earlier try kept there and a run
        re-created under the same run id does not."""
        parts = [_path_component(p) for p in (self.dag_id, self.run_id, self.task_id, str(self.map_index))]
        if self.run_key:
            parts.append(f"run-{_path_component(self.run_key)}")
        return "/".join([root.rstrip("/"), *parts])

    def prefix(self, root: ObjectStoragePath) -> ObjectStoragePath:
        path = root
        for part in (self.dag_id, self.run_id, self.task_id, str(self.map_index)):
            path = path / _path_component(part)
        attempt = f"-a{self.attempt}" if self.attempt > 1 else ""  # beside the try's others: same depth
        return path / (f"try-{self.try_number}-{_path_component(self.run_key)}{attempt}" if self.run_key
                       else f"try-{self.try_number}{attempt}")


def _marker(refs: list[ArtifactRef], ref: ArtifactRef) -> dict[str, int]:
    refs.append(ref)
    return {protocol.REF_MARKER: len(refs) - 1}


def replace_refs(value: Any, refs: list[ArtifactRef], depth: int = 0) -> Any:
    """Swap ArtifactRefs in arguments for markers the runtime resolves from staged files."""
    if depth > 64:
        return value
    if isinstance(value, ArtifactRef):
        return _marker(refs, value)
    if type(value) is dict:
        return {k: replace_refs(v, refs, depth + 1) for k, v in value.items()}
    if type(value) is list:
        return [replace_refs(v, refs, depth + 1) for v in value]
    if type(value) is tuple:
        return tuple(replace_refs(v, refs, depth + 1) for v in value)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray, memoryview, tuple, list)):
        # e.g. the lazy sequence Airflow passes for the results of a mapped task: materialise it,
        # never pickle the worker-side object (it holds the task instance and its context)
        return [replace_refs(v, refs, depth + 1) for v in value]
    return value


def _is_installed(module: ModuleType) -> bool:
    """Modules from site-packages or the stdlib can be imported remotely; DAG code cannot."""
    filename = getattr(module, "__file__", None)
    if not filename:
        return True
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return any(str(Path(filename).resolve()).startswith(str(Path(r).resolve())) for r in roots)


def register_by_value(fn: Any) -> None:
    """Pickle the DAG module, and every other module loaded from the same DAG folder, by value:
    the remote side has neither the DAG folder nor Airflow's import of it."""
    import cloudpickle

    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    filename = getattr(module, "__file__", None)
    if module is None or not filename or _is_installed(module):
        return
    roots = {os.path.dirname(os.path.abspath(filename)), os.path.dirname(str(Path(filename).resolve()))}
    try:
        from airflow_stepops._compat import airflow_conf

        dags_folder = airflow_conf().get("core", "dags_folder")
        roots.update({os.path.abspath(dags_folder), str(Path(dags_folder).resolve())})
    except Exception:
        pass
    for name, candidate in list(sys.modules.items()):
        path = getattr(candidate, "__file__", None)
        if (not path or name == "__main__" or name.split(".")[0] == "airflow_stepops"
                or not any(os.path.abspath(path).startswith(root + os.sep) for root in roots)
                or _is_installed(candidate)):
            continue
        try:
            cloudpickle.register_pickle_by_value(candidate)
        except (ValueError, TypeError):
            pass


def pickle_payload(fn: Any, args: list[Any], kwargs: dict[str, Any]) -> bytes:
    """cloudpickle the call; on failure name the argument that cannot be serialised."""
    import cloudpickle

    register_by_value(fn)
    try:
        return cloudpickle.dumps({"callable": fn, "args": args, "kwargs": kwargs}, protocol=5)
    except Exception as exc:
        culprit = find_unpicklable(fn, args, kwargs)
        raise StepOperatorConfigError(
            f"{culprit or 'the step'} cannot be serialised by cloudpickle ({type(exc).__name__}: {exc}); "
            "pass plain data, or an ArtifactRef, or create the object inside the step"
        ) from exc


def find_unpicklable(fn: Any, args: Any, kwargs: dict[str, Any]) -> str | None:
    import cloudpickle

    candidates: list[tuple[str, Any]] = [(f"op_args[{i}]", a) for i, a in enumerate(args)]
    candidates += [(f"op_kwargs[{k!r}]", v) for k, v in kwargs.items()]
    candidates.append(("python_callable", fn))
    for name, value in candidates:
        try:
            cloudpickle.dumps(value)
        except Exception:
            return name
    return None


def build_meta(identity: StepIdentity, *, multiple_outputs: bool, max_result_bytes: int,
               inline_result_max_bytes: int, task_label: str, requirements: str = "") -> protocol.Meta:
    import cloudpickle

    return {
        "format_version": protocol.FORMAT_VERSION,
        "python_version": list(sys.version_info[:3]),
        "cloudpickle_version": cloudpickle.__version__,  # the bootstrap checks it before loading the payload
        "multiple_outputs": multiple_outputs,
        "max_result_bytes": max_result_bytes,
        "inline_result_max_bytes": inline_result_max_bytes,
        "task_label": task_label,
        "identity": asdict(identity),
        "requirements": requirements,
    }


def write_bundle(bundle_dir: ObjectStoragePath, payload: bytes, meta: protocol.Meta) -> None:
    bundle_dir.mkdir(parents=True, exist_ok=True)
    (bundle_dir / protocol.PAYLOAD_FILE).write_bytes(payload)
    for name in (protocol.BOOTSTRAP_FILE, protocol.PROTOCOL_FILE):
        (bundle_dir / name).write_bytes((RUNTIME_DIR / name).read_bytes())
    # meta.json last: its presence means the bundle is complete
    (bundle_dir / protocol.META_FILE).write_text(json.dumps(meta))


def stage(bundle_uri: str, refs: Mapping[int | str, ArtifactRef] = {}, listing: protocol.Refs | None = None) -> None:
    """Put beside a written bundle what a remote job reads from its directory: the entry program, the input
    artifacts ``refs`` (by index) the job cannot reach where they are, and ``listing`` when the job's
    environment has no room for it."""
    bundle = store_path(bundle_uri)
    (bundle / protocol.ENTRY_FILE).write_bytes((RUNTIME_DIR / protocol.ENTRY_FILE).read_bytes())
    for index, ref in refs.items():
        with ref.open() as src, (bundle / protocol.staged_ref(index)).open("wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
    if listing is not None:
        (bundle / protocol.REFS_FILE).write_text(json.dumps(listing))


def entry_program() -> str:
    """``entry.py`` as one program for ``python -c`` (nothing is beside it there), with ``protocol.py`` run
    first as the module ``protocol`` it imports."""
    source = {name: (RUNTIME_DIR / name).read_text() for name in (protocol.PROTOCOL_FILE, protocol.ENTRY_FILE)}
    return ("import sys, types\nsys.modules['protocol'] = module = types.ModuleType('protocol')\n"
            f"exec(compile({source[protocol.PROTOCOL_FILE]!r}, 'protocol.py', 'exec'), module.__dict__)\n"
            f"exec(compile({source[protocol.ENTRY_FILE]!r}, 'entry.py', 'exec'), {{'__name__': '__main__'}})\n")


@dataclass
class StepOutcome:
    """What the runtime left in the output directory, read without unpickling anything."""

    ok: bool
    outputs: dict[str, Any] = field(default_factory=dict)
    multiple_outputs: bool = False
    error: protocol.Error | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> Any:
        return self.outputs if self.multiple_outputs else self.outputs.get("return_value")


def read_outcome(output_dir: ObjectStoragePath) -> StepOutcome | None:
    """Parse the result or error record; None if the runtime left neither."""
    result_file = output_dir / protocol.RESULT_FILE
    if result_file.exists():
        data: protocol.Result = json.loads(result_file.read_text())
        outputs: dict[str, Any] = {}
        for name, entry in data["outputs"].items():
            if entry["kind"] == "json":
                outputs[name] = entry["value"]
            else:
                outputs[name] = ArtifactRef(
                    uri=str(output_dir / entry["path"]), type=entry["type"], size=entry["size"],
                    sha256=entry["sha256"],
                )
        info = {k: v for k, v in data.items() if k not in ("outputs",)}
        return StepOutcome(ok=True, outputs=outputs, multiple_outputs=data.get("multiple_outputs", False), info=info)
    error_file = output_dir / protocol.ERROR_FILE
    if error_file.exists():
        return StepOutcome(ok=False, error=json.loads(error_file.read_text()))
    return None
