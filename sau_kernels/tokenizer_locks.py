"""One lock per tokenizer object, for prompt encoding from several threads.

A Hugging Face fast tokenizer keeps its padding and truncation settings on the object and
sets them on every call, so two threads sharing one tokenizer (pipelines built from one
set of components, a detector's base model, a server's worker threads) can each tokenize
with the other's padding: a prompt padded to the longest of its batch instead of the text
encoder's length, and a call that fails (or, with another tokenizer, reads the prompt
wrongly). Every tokenizer call of a patched pipeline's request runs under its tokenizers'
locks.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def tokenizer_lock(tokenizer) -> threading.RLock:
    """The lock of this tokenizer object (re-entrant: encode_prompt may call a locked helper)."""
    with _LOCKS_LOCK:
        lock = _LOCKS.get(tokenizer)
        if lock is None:
            lock = _LOCKS[tokenizer] = threading.RLock()
        return lock


@contextlib.contextmanager
def encoding(pipe):
    """Hold the locks of every tokenizer of `pipe` (SDXL has two), always taken in one order
    so that pipelines sharing only some of their tokenizers cannot deadlock."""
    tokenizers = {id(t): t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None))
                  if t is not None}
    with contextlib.ExitStack() as stack:
        for key in sorted(tokenizers):
            stack.enter_context(tokenizer_lock(tokenizers[key]))
        yield
