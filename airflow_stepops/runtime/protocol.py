"""The wire protocol between the worker and a job's runtime: file names, environment variables, records.

Both sides import it: the worker as ``airflow_stepops.runtime.protocol``, a job as ``protocol`` from its
bundle (it travels there beside ``bootstrap.py`` and ``entry.py``). Stdlib-only, like all of ``runtime``.
Bundle layout: ``bundle/{BUNDLE_FILES, ENTRY_FILE, REFS_FILE?, refs/<index>.pkl}``, ``output/{RESULT_FILE |
ERROR_FILE, <name>.pkl}``.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

FORMAT_VERSION = 1
#: the marker an ArtifactRef argument becomes in the payload: ``{REF_MARKER: <index of the input>}``
REF_MARKER = "__stepops_artifact__"

META_FILE = "meta.json"
PAYLOAD_FILE = "payload.pkl"
BOOTSTRAP_FILE = "bootstrap.py"
PROTOCOL_FILE = "protocol.py"
#: what bootstrap needs to run a step; written in this order, meta.json last (its presence means complete)
BUNDLE_FILES = (PAYLOAD_FILE, BOOTSTRAP_FILE, PROTOCOL_FILE, META_FILE)
#: the program a remote job starts (``runtime/entry.py``), staged beside the bundle files
ENTRY_FILE = "entry.py"
#: the input listing (``Refs``) when the job's environment has no room for ``Env.REFS``
REFS_FILE = "refs.json"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
#: one of them marks a finished try; copied last
OUTCOME_FILES = (RESULT_FILE, ERROR_FILE)
#: the type an error record names when the runtime itself, not the step, failed
FAILED_TYPE = "airflow_stepops.exceptions.StepFailedError"
#: the type an error record names when the step's requirements could not be installed
REQUIREMENTS_TYPE = "airflow_stepops.exceptions.StepRequirementsError"
#: a job's output record (Kubernetes termination message and log block): ``OUTPUT_PREFIX`` with the job's marker
OUTPUT_PREFIX = "::stepops-output:{marker}:"
#: the error record in a SageMaker failure reason: ``FAILURE_MARKER`` then base64 zlib JSON
FAILURE_MARKER = "stepops-error/1:"
#: the error record in the exception text of a failed Modal call: ``CALL_ERROR_MARKER`` then base64 JSON
CALL_ERROR_MARKER = "stepops-error:"


def masked(text: str) -> str:
    """``text`` with the credentials of its URLs (``https://user:token@host``) masked: requirements may name a
    private index that way, and they are shown in logs and by ``stepops render``."""
    import re

    return re.sub(r"(://)[^/@\s]+@", r"\1****@", text)


def staged_ref(index: int | str) -> str:
    """Where, relative to the bundle directory, input artifact ``index`` is staged."""
    return f"refs/{index}.pkl"


class Env:
    """The environment variables of a job's runtime; ``STEPOPS_*`` names are reserved for them."""

    PREFIX = "STEPOPS_"
    FLAVOR = "STEPOPS_FLAVOR"
    #: bundle: a mounted directory, or inline (``BUNDLE_PARTS`` chunks ``STEPOPS_BUNDLE_<n>`` of base64 gzip-tar
    #: with its ``BUNDLE_SHA256``), or a shared ``file://`` store
    BUNDLE_PATH = "STEPOPS_BUNDLE_PATH"
    BUNDLE = "STEPOPS_BUNDLE"
    BUNDLE_PARTS = "STEPOPS_BUNDLE_PARTS"
    BUNDLE_SHA256 = "STEPOPS_BUNDLE_SHA256"
    BUNDLE_URI = "STEPOPS_BUNDLE_URI"
    #: output: a mounted directory, or back through the termination message and log, or a shared store
    OUTPUT_PATH = "STEPOPS_OUTPUT_PATH"
    OUTPUT_URI = "STEPOPS_OUTPUT_URI"
    INLINE_MAX_BYTES = "STEPOPS_INLINE_MAX_BYTES"
    MARKER = "STEPOPS_MARKER"
    TERMINATION_LOG = "STEPOPS_TERMINATION_LOG"
    #: inputs: ``Refs`` as JSON, or the path of a file holding it
    REFS = "STEPOPS_REFS"
    REFS_FILE = "STEPOPS_REFS_FILE"
    #: a directory that outlives the job, where installed requirements are kept for the next job (optional)
    REQUIREMENTS_CACHE = "STEPOPS_REQUIREMENTS_CACHE"
    #: where the step keeps state that must survive a preemption (the step reads it)
    CHECKPOINT_DIR = "STEPOPS_CHECKPOINT_DIR"
    #: SageMaker: where its failure reason goes
    FAILURE_FILE = "STEPOPS_FAILURE_FILE"
    #: local flavor: the job directory (finds the step's processes) and its memory limit
    JOB_DIR = "STEPOPS_JOB_DIR"
    MEMORY_LIMIT_BYTES = "STEPOPS_MEMORY_LIMIT_BYTES"


class Meta(TypedDict):
    """``meta.json``: how the payload was made and what the result may be."""

    format_version: int
    python_version: list[int]
    cloudpickle_version: str
    multiple_outputs: bool
    max_result_bytes: int
    inline_result_max_bytes: int
    task_label: str
    identity: dict[str, Any]
    #: pip requirements installed before the step runs (requirements.txt syntax; "" for none)
    requirements: str


class Output(TypedDict, total=False):
    """One output in ``result.json``: inline JSON, or a pickle file beside it."""

    kind: Literal["json", "artifact"]
    value: Any
    path: str
    size: int
    sha256: str
    type: str


class Result(TypedDict, total=False):
    format_version: int
    host: str
    python: str
    multiple_outputs: bool
    outputs: dict[str, Output]
    duration_seconds: float


class Error(TypedDict, total=False):
    """``error.json``; ``phase`` is install (requirements), load (bad bundle or environment), run (the step
    raised) or transfer."""

    format_version: int
    host: str
    python: str
    phase: Literal["install", "load", "run", "transfer"]
    type: str
    message: str
    traceback: str


class RefSource(TypedDict, total=False):
    """Where a job finds one input: ``inline`` (relative to the bundle), ``path`` (mounted) or ``uri``."""

    inline: str
    path: str
    uri: str


#: the input listing: ``{"<index>": RefSource}``
Refs = dict[str, RefSource]
