"""A session's durability sequence numbers (StreamRequest.seq): what was received, applied, acknowledged,
and the verdict on a new number (see "Acknowledgements" in the .proto)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum

import grpc

from sinkstream.service.errors import RequestError


class Verdict(Enum):
    UNSEQUENCED = "unsequenced"  # seq 0: no durability bookkeeping
    NEW = "new"  # the next number: process it
    DUPLICATE = "duplicate"  # already received: answer again, never process twice


@dataclass
class SeqState:
    """Highest seq received on the current call, applied to the session's state (logged), and acknowledged
    (durable). received >= applied >= acked."""

    received: int = 0
    applied: int = 0
    acked: int = 0

    def check(self, seq: int) -> Verdict:
        """The verdict on a request numbered `seq`; OUT_OF_RANGE "seq" for a gap (nothing changes)."""
        if seq == 0:
            return Verdict.UNSEQUENCED
        if seq <= self.received:
            return Verdict.DUPLICATE
        if seq > self.received + 1:
            raise RequestError(grpc.StatusCode.OUT_OF_RANGE,
                               f"sequence gap: expected seq {self.received + 1} (or a duplicate <= "
                               f"{self.received}), got {seq}", "seq")
        return Verdict.NEW

    def receive(self, seq: int) -> None:
        self.received = max(self.received, seq)

    def apply(self, seq: int) -> None:
        self.applied = max(self.applied, seq)
        self.received = max(self.received, seq)

    def acknowledge(self, seq: int) -> bool:
        """Record `seq` durable; True if that moved the acknowledged mark."""
        if seq <= self.acked:
            return False
        self.acked = seq
        return True

    def release(self, seq: int) -> None:
        """`seq` (not acknowledged) was given up: it may come again as a new request."""
        assert seq > self.acked
        self.received = self.applied = min(self.applied, seq - 1)

    def forget_unapplied(self) -> None:
        """The call ended: numbers received but never applied (dropped requests) may come again."""
        self.received = self.applied

    def state(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, int]) -> SeqState:
        return cls(int(state["received"]), int(state["applied"]), int(state["acked"]))
