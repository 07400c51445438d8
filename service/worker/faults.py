"""FAULT_INJECT: the worker's test-only fault switch (a question can make its call raise, hang, be held, or
make the engine count as dead)."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("service")


@dataclass(frozen=True)
class Faults:
    """FAULT_INJECT, for tests only: questions that make their call raise (``raise_on``) or hang (``hang_on``),
    make the engine count as dead once their call is answered (``die_after``), or hold their call before it
    reaches the engine until the test releases it (``hold_on``, with ``hold_dir``: the worker writes
    ``held-<its pid>-<call id>`` there and waits for a file ``release``, then removes its marker)."""

    raise_on: tuple[str, ...] = ()
    hang_on: tuple[str, ...] = ()
    die_after: tuple[str, ...] = ()
    hold_on: tuple[str, ...] = ()
    hold_dir: str = ""

    @classmethod
    def parse(cls, text: str) -> Faults:
        """``raise_on=TEXT;hang_on=TEXT;die_after=TEXT;hold_on=TEXT;hold_dir=DIR`` (any of them, or empty);
        ValueError naming what is allowed."""
        found: dict[str, list[str]] = {"raise_on": [], "hang_on": [], "die_after": [], "hold_on": [], "hold_dir": []}
        allowed = ("FAULT_INJECT={text!r}: allowed raise_on=TEXT, hang_on=TEXT, die_after=TEXT and hold_on=TEXT "
                   "with hold_dir=DIR, separated by ;")
        for part in filter(None, (p.strip() for p in text.split(";"))):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in found or not value:
                raise ValueError(allowed.format(text=text))
            found[key.strip()].append(value)
        if bool(found["hold_on"]) != bool(found["hold_dir"]) or len(found["hold_dir"]) > 1:
            raise ValueError(allowed.format(text=text) + " (hold_on needs exactly one hold_dir)")
        return cls(tuple(found["raise_on"]), tuple(found["hang_on"]), tuple(found["die_after"]),
                   tuple(found["hold_on"]), "".join(found["hold_dir"]))

    @property
    def active(self) -> bool:
        """Whether any question can trigger a fault before the engine (else ``apply`` looks at none)."""
        return bool(self.raise_on or self.hang_on or self.hold_on)

    async def apply(self, call_id: int, questions: list[str]) -> None:
        if not self.active:  # the production case: no scan of every question on the request path
            return
        for question in questions:
            if any(text in question for text in self.raise_on):
                raise RuntimeError("FAULT_INJECT: a question asked this call to fail (test-only fault switch)")
            if any(text in question for text in self.hang_on):
                log.warning("FAULT_INJECT: a question asked this call to hang (test-only fault switch)")
                await asyncio.Event().wait()
        if any(text in question for question in questions for text in self.hold_on):
            await self._hold(call_id, len(questions))

    async def _hold(self, call_id: int, count: int) -> None:
        """Hold the call until ``hold_dir/release`` exists; ``hold_dir/held-PID-ID`` says that it is held."""
        folder = Path(self.hold_dir)
        marker, release = folder / f"held-{os.getpid()}-{call_id}", folder / "release"
        marker.write_text(f"{count}\n")
        log.warning("FAULT_INJECT: call %d (%d questions) is held until %s exists", call_id, count, release)
        try:
            while not release.exists():
                await asyncio.sleep(0.01)
        finally:
            marker.unlink(missing_ok=True)

    async def answered(self, questions: list[str], dead: asyncio.Future[str]) -> None:
        """``die_after``: the engine counts as dead from now, and the call's reply is put one round later, after
        the worker has seen the death: the narrowest order in which a real death can meet a finished call."""
        if not dead.done() and any(text in q for q in questions for text in self.die_after):
            log.warning("FAULT_INJECT: a question asked the engine to count as dead after its answer")
            dead.set_result("FAULT_INJECT: the engine counts as dead after answering (test-only fault switch)")
            await asyncio.sleep(0)


NO_FAULTS = Faults()
