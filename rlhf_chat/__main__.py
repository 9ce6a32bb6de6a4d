"""``python -m rlhf_chat``: the command-line tools (see :mod:`rlhf_chat.cli`)."""

from rlhf_chat.cli import main

if __name__ == "__main__":
    main()
