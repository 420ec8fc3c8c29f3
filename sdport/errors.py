"""The one exception family the CLI turns into a one-line message and a non-zero exit."""


class SdportError(Exception):
    """A user-facing error: the message says what went wrong, where, and how to fix it."""


class UsageError(SdportError, ValueError):
    """A request that cannot be served as given (bad size, unknown scheduler, ...)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (a library's may run to pages), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def typed_first_line(exc: BaseException) -> str:
    """"Type: first line" of an exception, for errors raised by code that is not ours."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
