"""Flag types and help texts shared by the commands."""
from __future__ import annotations

from typing import Optional

import click

from swarmtrain.units import parse_memory_size

MULTIADDR_HELP = "multiaddr(s), e.g. /ip4/0.0.0.0/tcp/31337; repeat the flag or separate with spaces"


class ParsedValue(click.ParamType):
    """A flag whose text `parse` turns into a value, raising ValueError with the message for the user.

    :param name: the metavar shown in --help
    :param parse: text -> value
    :param parsed_types: a value (a default) of one of these types is taken as already parsed
    """

    def __init__(self, name: str, parse, parsed_types: tuple):
        self.name, self.parse, self.parsed_types = name, parse, parsed_types

    def convert(self, value, param, ctx):
        if isinstance(value, self.parsed_types):
            return value
        try:
            return self.parse(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


def parse_batch_size(text: str) -> Optional[int]:
    """A positive integer, or auto (None: sized to memory)."""
    if text == "auto":
        return None
    try:
        number = int(text)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ValueError(f"{text!r} is neither a positive number of samples nor 'auto'")
    return number


BATCH_SIZE = ParsedValue("N|auto", parse_batch_size, (int, type(None)))
MEMORY_SIZE = ParsedValue("SIZE", parse_memory_size, (int,))
