"""The package's exceptions.

A small tree: `CachefitError` is the base of everything cachefit raises on
purpose; `InputError` is bad input and is also a `ValueError`, so code that
already catches `ValueError` keeps working.  "No plan exists" is never an
exception: it is a `Plan` with status ``INFEASIBLE``.
"""

__all__ = ["CachefitError", "InputError", "short_repr"]


class CachefitError(Exception):
    """Base class of the errors cachefit raises on purpose."""


class InputError(CachefitError, ValueError):
    """An argument, a graph node or a file is not what was expected.

    The message names the argument (in backticks) or the node and says what
    was required.
    """


def short_repr(value):
    """`value` as an error message shows it: its repr, cut to 50 characters and "…" beyond 60.

    >>> short_repr("x" * 100)
    "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx…"
    >>> short_repr(3)
    '3'
    """
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:50]}…"
