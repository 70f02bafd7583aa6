"""The rollout stream: a private Redis server, the durable buffer on it, and the group codec."""
