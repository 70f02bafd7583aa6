"""Weight transport from the learners to the engines: the broadcast group, sender/receiver, IPC.

Learner rank 0 -> rollout engines: broadcast new weights after each step, with a timeout on every wait.

    sender = WeightSender(host, port, num_engines, cfg)                      # learner rank 0 (weights.sender)
    stats = sender.broadcast(((n, p) for n, p in model.named_parameters() if p.requires_grad), version)
    receiver = WeightReceiver(host, port, rank, num_engines, cfg, name)      # engine `rank` in 1..num_engines
    version, named = receiver.receive()                                      # (weights.receiver)
    engine.update_weights(named, version)

Parameters are consumed lazily, one at a time, and copied into flat per-dtype buckets of at most
`bucket_mb` (a larger tensor is sent on its own, straight from the caller's memory) before the next one is
pulled, so a ZeRO-3 caller may gather each parameter just before yielding it and release it after. A JSON
header per bucket (version, names, shapes, dtype, offsets) goes through the group's store ahead of the
data, so engines need no prior knowledge and check what arrives. Each engine confirms a version with an ack
key; an engine that is dead (its heartbeat stopped), stuck (never starts or never confirms) or failed is
named in a `WeightSyncError` raised within about `timeout_s` (plus a few heartbeats to tell who died).
After an error the group is unusable: close both sides and form a new one (a new port; a replacement
engine may join). The group itself, its store keys and wire format live in `weights.group`; colocated
engines map the learner's tensors instead (`weights.ipc`).
"""
