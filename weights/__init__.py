"""Weight transport from the learners to the engines: the broadcast group, sender/receiver, IPC."""
