"""Serving: what a person meets: admission limits, the batcher of several people's pairs, the chat and admin handlers, the UI layout, the Training tab, health and the replica's policy follower."""
