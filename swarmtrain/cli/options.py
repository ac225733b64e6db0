"""Flag types and help texts shared by the commands."""
from __future__ import annotations

import click

MULTIADDR_HELP = "multiaddr(s), e.g. /ip4/0.0.0.0/tcp/31337; repeat the flag or separate with spaces"


class BatchSizeType(click.ParamType):
    """A positive integer, or auto (None: sized to memory)."""
    name = "N|auto"

    def convert(self, value, param, ctx):
        if value is None or value == "auto":
            return None
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = 0
        if number < 1:
            self.fail(f"{value!r} is neither a positive number of samples nor 'auto'", param, ctx)
        return number


class MemorySizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        from swarmtrain.units import parse_memory_size

        if isinstance(value, int):
            return value
        try:
            return parse_memory_size(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


BATCH_SIZE, MEMORY_SIZE = BatchSizeType(), MemorySizeType()
