"""What each `launch.py` command does, one module per command (eval, embed, search, archive:
index and index-ann, metrics, demo; serve runs medfinder_jax/serve.py): it reads the flags'
values, calls the library, writes the command's files on process 0 and formats what the command
prints. launch.py only parses flags and calls `run`."""
