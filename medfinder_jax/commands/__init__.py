"""What each `launch.py` command does, one module per command (eval, embed, search, metrics,
demo): it reads the flags' values, calls the library, writes the command's files on process 0
and formats what the command prints. launch.py only parses flags and calls `run`."""
