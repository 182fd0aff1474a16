"""lowrank's exceptions: one base type, one subclass per concern.

Every message names the file, key or record at fault and says what was expected, so a
user can fix the input without reading lowrank's source.
"""

import argparse


class LowrankError(Exception):
    """Base of every error lowrank raises on bad input or an impossible setting."""


class CheckpointError(LowrankError):
    """A model or adapter folder is missing, corrupt, or does not match the model."""


class ConfigError(LowrankError):
    """A configuration asks for something lowrank cannot honour."""


class DataError(LowrankError):
    """A data file is malformed or holds a record that cannot be trained on."""


class CommandLineParser(argparse.ArgumentParser):
    """The parser of every `python -m lowrank.*` command: a bad flag is one line and status 2,
    as every other bad input."""

    def error(self, message):
        self.exit(2, f"lowrank: error: {message}\n")
