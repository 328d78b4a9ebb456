"""The remote side of a step. Stdlib-only: remote images need Python and cloudpickle, nothing else."""
