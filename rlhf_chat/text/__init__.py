"""Text: what words say, with no model: the chat template and message cleaning, and the behaviour detectors."""
