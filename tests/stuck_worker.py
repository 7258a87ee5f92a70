"""A tokenizer worker that never finishes its chunk (run in data.py's worker processes, which import it by name)."""

import time


def encode(texts):
    time.sleep(300)
