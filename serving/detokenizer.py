"""A generated sequence's text, grown one token at a time at a cost that does not grow with it.

Decoding every token list from the start after each new token costs O(n) per token, O(n^2) per
sequence. `IncrementalText` decodes only a short window: the tokens since the last complete
piece of text plus those of that piece (the detokenization of Hugging Face's
text-generation-inference and vLLM): the new text is what decoding the window adds to decoding
its first part, which stays right for tokenizers whose decoding of a token depends on the one
before it (SentencePiece drops the space of a text's first piece). A token that ends inside a
multi-byte UTF-8 character (the decoding ends with U+FFFD) waits for the next one. Stop strings
are searched for in the new text only (with the overlap a stop string spanning two pieces
needs), so a step's cost does not grow with the text (but for appending to the string).
"""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHARACTER = "\ufffd"


class IncrementalText:
    """The text of a growing token sequence, and the first stop string in it.

    Args:
      tokenizer: a data.tokenization tokenizer (`decode(ids) -> str`).
      stop: strings that end the text before them: the first to be completed as tokens arrive
        (of those completed by the same update, the one that starts first), as OpenAI's API
        and vLLM stop.

    Append ids to `token_ids`, then call `update`. After each update `text` is
    a prefix of `tokenizer.decode(token_ids)` without a trailing incomplete character; after
    `update(final=True)` it equals that decoding, cut before the stop string if one occurred
    (`stop_at`).
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._overlap = max((len(s) - 1 for s in self._stop), default=0)
        self.token_ids: list[int] = []
        self.text = ""
        self.stop_at: int | None = None  # where the stop string starts, once one is seen
        self._prefix = 0  # the window starts here (the tokens of the last piece of text)
        self._read = 0  # tokens up to here are in `text`
        self._searched = 0  # characters of `text` already searched for stop strings
        self.finished = False

    def stable_length(self) -> int:
        """How much of `text` is final, to hand out: all of it after a stop string or the final
        update, else all but the last characters that could still begin a stop string."""
        if self.stop_at is not None or self.finished:
            return len(self.text)
        return max(len(self.text) - self._overlap, 0)

    def update(self, final: bool = False) -> None:
        """Decodes the tokens appended to `token_ids` since the last update into `text` (but a
        trailing incomplete character, unless `final`: then it joins as U+FFFD), and looks for
        the stop strings in what it added."""
        self.finished = final
        if self.stop_at is not None or self._read == len(self.token_ids):
            return
        decode = self._tokenizer.decode
        before = decode(self.token_ids[self._prefix : self._read]) if self._read else ""
        window = decode(self.token_ids[self._prefix :])
        if len(window) <= len(before) or (window.endswith(REPLACEMENT_CHARACTER) and not final):
            return  # nothing new yet, or a character still incomplete
        self.text += window[len(before) :]
        self._prefix, self._read = self._read, len(self.token_ids)
        self._find_stop()

    def _find_stop(self) -> None:
        # A stop string ending in the new text starts at most `overlap` characters before it.
        start = max(self._searched - self._overlap, 0)
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.stop_at = min(hits)
            self.text = self.text[: self.stop_at]
        self._searched = len(self.text)
