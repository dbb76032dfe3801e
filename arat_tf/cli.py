"""What every command-line tool of arat_tf shares: how a bad invocation is reported."""

HELP_POINTER = "Run with --helpfull to list every flag with its default."


def usage_error(message):
    """The exception a tool raises for a bad flag value or argument: `raise usage_error(...)`.

    It prints `error: <message>` and one line pointing at `--helpfull`, and exits with status 1.
    (absl's `app.UsageError` would print the tool's whole help, some 160 lines for the training
    flags, before the one line that matters.)
    """
    return SystemExit(f"error: {message}\n{HELP_POINTER}")
