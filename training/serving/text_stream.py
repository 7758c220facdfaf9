"""TextStream: the text of a growing list of generated tokens, released piece by piece.

``push(token_id) -> (delta, stopped)``: the new text that is safe to send and whether a stop
string was reached. Text is held back while it could still be the beginning of a stop string
or ends in an incomplete UTF-8 character (byte-level tokenizers decode a partial character to
U+FFFD), so the concatenated deltas always equal the final text: everything generated, cut
before the first stop string.
"""
from __future__ import annotations


class TextStream:
    """See the module docstring. ``decode(ids) -> str`` is the tokenizer's decoder."""

    def __init__(self, decode, stop: list[str]):
        self.decode, self.stop = decode, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already released

    def _held(self, text: str) -> int:
        """How many trailing characters of ``text`` must wait."""
        held = 1 if text.endswith("\ufffd") else 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    held = max(held, n)
                    break
        return held

    def push(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(int(token_id))
        text = self.decode(self.ids)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            end = min(cuts)
            delta, self.sent = text[self.sent:end], max(self.sent, end)
            return delta, True
        end = max(self.sent, len(text) - self._held(text))
        delta, self.sent = text[self.sent:end], end
        return delta, False

    def flush(self) -> str:
        """The held-back rest (the generation ended without a stop string)."""
        text = self.decode(self.ids)
        delta, self.sent = text[self.sent:], len(text)
        return delta
