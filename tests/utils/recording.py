"""A dispatcher that records what the engine would send, for engine tests."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field

from app.engine import Dispatch


@dataclass
class RecordingDispatcher:
    """Keeps the dispatches instead of publishing them to the broker."""

    sent: list[Dispatch] = field(default_factory=list)

    def send(self, dispatches: Sequence[Dispatch]) -> None:
        self.sent.extend(dispatches)

    async def send_async(
        self, dispatches: Sequence[Dispatch], committed: Awaitable[object] | None = None
    ) -> None:
        self.sent.extend(dispatches)
        if committed is not None:
            await committed
