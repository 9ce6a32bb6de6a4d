"""Evaluation: judging answers and the loop: the behaviour detectors (which the Training tab also reads), the scripted labelers and the headless simulation; tools, apart from the detectors."""
