"""Errors that are the user's to fix: printed as one line, exit code 1, never a traceback."""
import click


class UserError(click.ClickException):
    """A mistake in input (config, flags, addresses) with a message saying what to change."""
