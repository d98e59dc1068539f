"""A reply's text, piece by piece, as the model samples its tokens.

llama.cpp's completion stops at a stop sequence and cuts it off the text; a piece that
might be the start of one is held back until the next tokens show it is not, so the
pieces joined are always a prefix of the completion's text. At the end,
:meth:`TextPieces.finish` sends what is left of the final text.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)


class TextPieces:
    """Sampled tokens in, text pieces out to ``emit``."""

    def __init__(self, llm: Any, emit: Callable[[str], None], stops: Sequence[str]) -> None:
        import llama_cpp

        self._vocab = llm._model.vocab
        self._detokenize = llm._model.detokenize  # exact bytes (token_to_piece pads them)
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self._emit = emit
        self._stops = [s for s in stops if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")("ignore")
        self._held = ""  # decoded, not yet sent: it may begin a stop sequence
        self.sent = ""  # everything sent so far

    def __call__(self, token: int) -> None:
        if self._is_eog(self._vocab, token):
            return
        self._held += self._decoder.decode(self._detokenize([token], special=False))
        cut = self._safe_end(self._held)
        if cut:
            self._send(self._held[:cut])
            self._held = self._held[cut:]

    def _safe_end(self, text: str) -> int:
        """How much of ``text`` cannot be part of a stop sequence."""
        end = len(text)
        for stop in self._stops:
            found = text.find(stop)
            if found >= 0:
                end = min(end, found)
                continue
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    end = min(end, len(text) - n)
                    break
        return end

    def _send(self, text: str) -> None:
        self.sent += text
        self._emit(text)

    def finish(self, final: str) -> None:
        """Send the rest of the completion's ``final`` text (what was held back and not cut)."""
        if final.startswith(self.sent):
            if len(final) > len(self.sent):
                self._send(final[len(self.sent) :])
        else:  # a tokenizer whose pieces do not add up: the stored output is the answer
            log.warning("streamed text is not a prefix of the completion; stopped streaming")
