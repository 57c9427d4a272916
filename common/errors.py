"""The one error type that scripts turn into a one-line message, and the
exit statuses scripts end with (docs/errors.md)."""

USER_ERROR_EXIT = 2
INTERRUPT_EXIT = 130  # 128 + SIGINT, what shells report for Ctrl-C


class UserError(Exception):
    """Bad input from the user (config, file, model_def, data).

    Scripts catch it at the top, print ``error: <message>`` on one line to
    stderr and exit with status 2, without a traceback.
    """
