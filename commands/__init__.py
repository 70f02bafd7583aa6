"""User tools on top of the runtime: the `clsrl` CLI, eval, transfer, report."""
