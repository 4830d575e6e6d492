"""The package's exceptions.

A small tree: `CachefitError` is the base of everything cachefit raises on
purpose; `InputError` is bad input and is also a `ValueError`, so code that
already catches `ValueError` keeps working.  "No plan exists" is never an
exception: it is a `Plan` with status ``INFEASIBLE``.
"""

__all__ = ["CachefitError", "InputError"]


class CachefitError(Exception):
    """Base class of the errors cachefit raises on purpose."""


class InputError(CachefitError, ValueError):
    """An argument, a graph node or a file is not what was expected.

    The message names the argument (in backticks) or the node and says what
    was required.
    """
