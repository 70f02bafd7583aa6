"""What a run records: log files and console, metrics sinks, plots."""
