"""The one exception type for mistakes a user can make.

The CLI turns a :class:`UserError` into one clear line on stderr and a non-zero exit, with no
traceback. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: a bad path, a bad range, a missing credential.

    The message must be one line that says what is wrong and, where possible, what to do.
    """

    exit_code = 2
