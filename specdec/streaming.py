"""Streaming: an incremental detokenizer and a transformers-protocol streamer.

Decoding each step's tokens alone breaks words ("he" + "llo" -> "he llo" with
SentencePiece) and splits multi-byte UTF-8 characters. Instead we decode a short
window that starts a few tokens *before* the new ones and emit only the text that
window adds beyond its already-decoded part, holding back a trailing U+FFFD
(an incomplete UTF-8 sequence) until the next token completes it.
"""
from __future__ import annotations

import queue

from transformers.generation.streamers import BaseStreamer

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces whose concatenation equals
    ``tokenizer.decode(all_ids)`` (for tokenizers whose decode is prefix-stable)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True, context: int = 5):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.context = context
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # ids before this are already emitted as text

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add(self, new_ids) -> str:
        """Append token ids; return the newly finished text (may be '')."""
        self.ids.extend(int(t) for t in new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        if full_text.endswith(_INCOMPLETE) or len(full_text) <= len(prefix_text):
            return ""  # wait for the rest of a multi-byte character
        if not full_text.startswith(prefix_text):  # decode not prefix-stable: resync on the window
            prefix_text = prefix_text.rstrip(_INCOMPLETE)
        piece = full_text[len(prefix_text):]
        self.prefix_offset = max(self.prefix_offset, len(self.ids) - self.context)
        self.read_offset = len(self.ids)
        return piece

    def flush(self) -> str:
        """Text still held back at the end (e.g. a dangling partial character)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        self.read_offset = len(self.ids)
        return full_text[len(prefix_text):] if full_text.startswith(prefix_text) else ""


class TextStreamer(BaseStreamer):
    """transformers streamer protocol (put / end) with exact incremental detokenization.

    Iterate over it (like ``TextIteratorStreamer``) from another thread, or pass
    ``on_text`` (e.g. ``print``) to consume pieces as they come."""

    def __init__(self, tokenizer, skip_prompt: bool = True, skip_special_tokens: bool = True,
                 on_text=None, timeout: float | None = None):
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.skip_prompt = skip_prompt
        self.on_text = on_text
        self.timeout = timeout
        self._queue: queue.Queue = queue.Queue()
        self._prompt_seen = False
        self.text = ""

    def put(self, value) -> None:
        ids = value.reshape(-1).tolist() if hasattr(value, "reshape") else list(value)
        if not self._prompt_seen:
            self._prompt_seen = True
            if self.skip_prompt:
                self.detok.ids.extend(ids)
                self.detok.prefix_offset = max(0, len(ids) - self.detok.context)
                self.detok.read_offset = len(ids)
                return
        self._emit(self.detok.add(ids))

    def end(self) -> None:
        self._emit(self.detok.flush())
        self._queue.put(None)

    def _emit(self, piece: str) -> None:
        if not piece:
            return
        self.text += piece
        if self.on_text is not None:
            self.on_text(piece)
        self._queue.put(piece)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        piece = self._queue.get(timeout=self.timeout)
        if piece is None:
            raise StopIteration
        return piece
