"""Click errors shared by the ``msibench`` command modules (only click is imported here)."""

from __future__ import annotations

import click

from msibench import exitcodes

METHOD_HELP = (
    "A built-in method (msibench ls), an installed plugin's name (entry point msibench.methods), "
    "path/to/file.py:Class or package.module:Class."
)


class UsageClickError(click.ClickException):
    """A usage error printed as ``Error: ...`` without the usage line, with exit code 2 (:data:`exitcodes.USAGE`)."""

    exit_code = exitcodes.USAGE


def method_error(err: Exception) -> click.ClickException:
    """The click error for a ``--method`` that cannot be resolved: a name nobody registered or a plugin that is not
    usable is a usage error (exit 2); a built-in whose module is missing, or bad options, an error (exit 1)."""
    from msibench import registry

    if isinstance(err, registry.UnknownMethodError):
        return UsageClickError(str(err))
    return click.ClickException(str(err))
