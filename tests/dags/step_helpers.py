"""A helper module beside the test DAGs: steps that use it need it pickled by value."""


def triple(x: int) -> int:
    return 3 * x
