"""The one error type whose message is meant for the person using selfcog.

Every front end catches ``UserError`` and shows ``str(e)`` as one line (the CLI on stderr with a
non-zero exit, the web page beside the input, Telegram as a reply); anything else is a bug and is
logged with its traceback. Kept free of imports so every package can use it.
"""


class UserError(Exception):
    """Something the user can fix or retry; the message says what happened and what to do."""
