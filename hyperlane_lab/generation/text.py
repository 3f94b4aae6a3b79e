"""Incremental detokenization with EOS and stop strings, shared by every generation driver."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SequenceState"]


@dataclass
class SequenceState:
    """One sequence being generated: its ids, its text so far, and why it stopped."""

    prompt_ids: list[int]
    tokenizer: Any
    max_tokens: int
    eos_ids: frozenset[int]
    stop: Sequence[str] = ()
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "length" | "eos" | "stop"
    _emitted: int = 0  # characters of `text` already handed to a stream
    _prefix: str | None = None  # decoded prompt

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> str:
        """Add one generated token; return the new text that is safe to show (may be "")."""
        if self.done:
            return ""
        if token in self.eos_ids:
            self.finish_reason = "eos"
            return self._flush()
        self.token_ids.append(token)
        if self.tokenizer is None:  # token ids only (random-weight models)
            if len(self.token_ids) >= self.max_tokens:
                self.finish_reason = "length"
            return ""
        if self._prefix is None:
            self._prefix = self.tokenizer.decode(self.prompt_ids, skip_special_tokens=True)
        full = self.tokenizer.decode(self.prompt_ids + self.token_ids, skip_special_tokens=True)
        # drop the prompt's text; a prompt ending inside a multi-byte character decodes to U+FFFD
        # alone but to the real character together with the next token: cut at the common prefix
        cut = len(self._prefix)
        if not full.startswith(self._prefix):
            cut = next((i for i, (a, b) in enumerate(zip(self._prefix, full)) if a != b), cut)
        self.text = full[cut:]
        cuts = [c for c in (self.text.find(s) for s in self.stop) if c >= 0]
        if cuts:  # cut at the earliest stop string, whichever of them it is
            self.text = self.text[: min(cuts)]
            self.finish_reason = "stop"
            return self._flush()
        if len(self.token_ids) >= self.max_tokens:
            self.finish_reason = "length"
            return self._flush()
        # hold back a possible stop-string prefix and an incomplete UTF-8 character. Byte-fallback
        # tokenizers decode a run of byte tokens with one \ufffd per byte until the run is valid
        # UTF-8 (and then re-decode the whole run), so hold back every trailing \ufffd.
        safe = len(self.text)
        while safe > 0 and self.text[safe - 1] == "\ufffd":
            safe -= 1
        for s in self.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        if safe <= self._emitted:
            return ""
        delta = self.text[self._emitted : safe]
        self._emitted = safe
        return delta

    def _flush(self) -> str:
        delta = self.text[self._emitted :]
        self._emitted = len(self.text)
        return delta
