"""Generation: the one model worker, sampling (nucleus, repetition stop, the decoding loop) and response modes; used by serving and learning alike."""
