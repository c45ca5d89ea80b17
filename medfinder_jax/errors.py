"""The one base class of the mistakes a user can fix: bad flags, files, folders and settings.

Every module raises its own subclass (ConfigError, CorpusError, BadVolume, DatasetError,
CheckpointError, ...) with a message that names the file or field, what was found and what was
expected. `launch.py` turns any of them into that one line on stderr and exit code 2, so no
command needs its own translation, and a traceback always means a bug.
"""


class UserError(ValueError):
  """A problem the user can fix; str() is the whole message shown to them."""
