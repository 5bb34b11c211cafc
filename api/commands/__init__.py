"""Tool commands of the `steer` CLI, mounted by `api/cli.py`: `steer eval`, `steer bench serve|train|load`."""
