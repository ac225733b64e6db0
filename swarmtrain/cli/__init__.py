"""The ``swarmtrain`` command line: one module per command family (``coordinator``, ``peer``,
``demo``, ``doctor``; ``audit`` lives with the privacy code and ``tokenizer`` with the data code),
the shared flag types (``options``) and the logging set-up that keeps hivemind's noise out of a
volunteer's terminal (``logs``). Commands import their heavy dependencies lazily, so ``--help`` is
fast."""
from swarmtrain.cli.main import main

__all__ = ["main"]
