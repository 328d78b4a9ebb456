"""What Modal's server checks when a function is created, so a definition it would refuse is refused here.

From Modal's guides: GPU types T4, L4, A10 (A10G is its older name), L40S, A100 (-40GB, -80GB), RTX-PRO-6000,
H100 (H100! pins it), H200, B200 (B200+), plus ``any``; "B200, H200, H100, A100, L4, T4 and L40S instances
support up to 8 GPUs ... and A10 instances support up to 4 GPUs" (the GPU guide); timeouts "between 1
second and 24 hours" (the timeouts guide). The client upper-cases the type before sending it. CPU and
memory have a maximum "enforced at Function creation time" whose value the guides do not give, so they are
not checked. The error texts are the emulator's own.
"""

from __future__ import annotations

from grpclib import GRPCError, Status
from modal_proto import api_pb2

GPU_MAX_COUNT: dict[str, int] = {
    "T4": 8, "L4": 8, "A10": 4, "A10G": 4, "L40S": 8, "A100": 8, "A100-40GB": 8, "A100-80GB": 8,
    "RTX-PRO-6000": 8, "H100": 8, "H100!": 8, "H200": 8, "B200": 8, "B200+": 8, "ANY": 8,
}
#: what ``gpu="any"`` is granted, in order of preference (the first one with capacity)
ANY_GPU_ORDER = ("L4", "A10", "T4")
MIN_TIMEOUT_SECS = 1
MAX_TIMEOUT_SECS = 24 * 60 * 60
#: "The results of a .spawn() are accessible via FunctionCall.get() for up to 7 days after completion. After
#: this period, we return an expired response." (https://modal.com/docs/guide/job-queue)
OUTPUT_RETENTION_SECS = 7 * 24 * 60 * 60


def check_function(fn: api_pb2.Function) -> None:
    """INVALID_ARGUMENT for an unknown GPU type, a GPU count out of range or a timeout out of range."""
    gpu = fn.resources.gpu_config
    if gpu.gpu_type or gpu.count:
        kind = gpu.gpu_type.upper()
        if kind not in GPU_MAX_COUNT:
            raise GRPCError(Status.INVALID_ARGUMENT,
                            f"Function {fn.function_name!r}: unknown GPU type {gpu.gpu_type!r}. Supported GPU "
                            f"types: {', '.join(sorted(GPU_MAX_COUNT))}.")
        most = GPU_MAX_COUNT[kind]
        if not 1 <= gpu.count <= most:
            raise GRPCError(Status.INVALID_ARGUMENT,
                            f"Function {fn.function_name!r}: {gpu.count} {kind} GPUs requested; {kind} containers "
                            f"can have between 1 and {most} GPUs.")
    if not MIN_TIMEOUT_SECS <= fn.timeout_secs <= MAX_TIMEOUT_SECS:
        raise GRPCError(Status.INVALID_ARGUMENT,
                        f"Function {fn.function_name!r}: timeout of {fn.timeout_secs}s is out of range; timeouts "
                        f"must be between {MIN_TIMEOUT_SECS} second and {MAX_TIMEOUT_SECS} seconds (24 hours).")
