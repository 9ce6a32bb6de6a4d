"""Serving: what a person meets: chat, candidates (sampling, modes, loop stop), the model worker, the UI, the Training tab, the arena and the admin controls."""
