"""Entry point of a SageMaker step's container: ``pod_entry`` (copied beside it), then the failure file.

SageMaker keeps, of a failed job, the first 1024 characters of ``/opt/ml/output/failure`` as
``FailureReason`` ("If training fails ... SageMaker returns the first 1024 characters from this file as
FailureReason",
https://docs.aws.amazon.com/sagemaker/latest/dg/your-algorithms-training-algo-output.html); what it
uploads of ``/opt/ml/model`` for a failed job is not documented, so the step's error record
(``error.json``) travels in that file: a readable first line, then ``MARKER`` and the record as
base64 zlib JSON (the zlib checksum tells a cut record from a whole one), its traceback shortened
from the top until it fits. Stdlib only, like ``pod_entry``.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import zlib

MARKER = "stepops-error/1:"
#: characters of the failure file SageMaker keeps (1024), less room for its "AlgorithmError: " prefix
#: and ", exit code: N" suffix
BUDGET = 960


def encode_failure(error: dict, budget: int = BUDGET) -> str:
    """The failure file's text for the error record ``error``, at most ``budget`` characters."""
    error = {k: error.get(k, "") for k in ("type", "message", "traceback", "phase")}
    lines = str(error["traceback"]).splitlines(keepends=True)
    while True:
        headline = f"{str(error['type']).rsplit('.', 1)[-1]}: {error['message']}".splitlines()[0][:160] + "\n"
        packed = base64.b64encode(zlib.compress(json.dumps(error).encode(), 9)).decode()
        text = headline + MARKER + packed
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


def write_failure(output: str, path: str) -> None:
    try:
        with open(os.path.join(output, "error.json"), encoding="utf-8") as fh:
            error = json.load(fh)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(encode_failure(error))
    except (OSError, ValueError):
        pass  # no record: SageMaker reports the last log lines


def main() -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import pod_entry  # type: ignore[import-not-found]  # copied beside this file into the bundle

    code = int(pod_entry.main())
    if code:
        write_failure(os.environ["STEPOPS_OUTPUT_PATH"], os.environ["STEPOPS_FAILURE_FILE"])
    return code


if __name__ == "__main__":
    sys.exit(main())
