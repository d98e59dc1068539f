"""A dispatcher that records what the engine would send, for engine tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from app.engine import Dispatch


@dataclass
class RecordingDispatcher:
    """Keeps the dispatches instead of publishing them to the broker."""

    sent: list[Dispatch] = field(default_factory=list)

    def send(self, dispatches: Sequence[Dispatch]) -> None:
        self.sent.extend(dispatches)

    async def send_async(self, dispatches: Sequence[Dispatch]) -> None:
        self.sent.extend(dispatches)
