"""The one exception type the exporter's command line turns into a one-line error and exit code 2."""


class ExportError(Exception):
    """A problem with the exporter's input (corrupt, truncated or unsupported file), not a bug.

    The message names the offending file and says what is wrong with it.
    """
