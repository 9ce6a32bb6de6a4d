"""Evaluation: judging the loop from outside: the scripted labelers and teachers and the headless simulation (the top of the package, beside the command line)."""
