"""The types every package may import: config sections and the messages between actors."""
