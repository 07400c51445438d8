"""The engine worker's test-only fault switch (FAULT_INJECT, service.worker.faults.Faults), without an engine.

The servers of the suite use it for real (tests/test_pool.py and the hold gate of tests/conftest.py); this
checks its parsing and the gate's file protocol on their own.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from service.worker.faults import Faults
from tests.conftest import Gate


def test_parse_every_key_and_refuse_what_is_not_allowed(tmp_path: Path) -> None:
    faults = Faults.parse(f"raise_on=A;hang_on=B; die_after=C;hold_on=D;hold_on=E;hold_dir={tmp_path}")
    assert faults == Faults(("A",), ("B",), ("C",), ("D", "E"), str(tmp_path))
    assert Faults.parse("") == Faults()
    for bad in ("explode=A", "raise_on", "raise_on=", "hold_on=A", f"hold_dir={tmp_path}",
                f"hold_on=A;hold_dir={tmp_path};hold_dir={tmp_path}"):
        with pytest.raises(ValueError, match="allowed raise_on=TEXT"):
            Faults.parse(bad)


def test_a_marked_call_is_held_until_released_and_says_so(tmp_path: Path) -> None:
    gate = Gate(tmp_path / "gate")
    faults = Faults.parse(gate.fault)

    async def scenario() -> None:
        await asyncio.wait_for(faults.apply(1, ["not marked"]), 1)  # passes at once
        held = asyncio.create_task(faults.apply(7, gate.marked(["a", "b", "c"])))
        while not gate.held():
            await asyncio.sleep(0.01)
        (marker,) = gate.held()
        assert marker.name == f"held-{os.getpid()}-7" and marker.read_text() == "3\n"
        await asyncio.sleep(0.1)
        assert not held.done(), "a held call went on before its release"
        (gate.folder / "release").touch()
        await asyncio.wait_for(held, 5)
        assert gate.held() == []  # the call removed its marker as it left the gate

    asyncio.run(scenario())
