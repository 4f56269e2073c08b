"""Hostile clients (slowloris, half-open, oversized headers, a flood) do not starve others."""
from __future__ import annotations

import asyncio

from harness.hostile import run
from harness.bus import BusServer


def test_a_normal_client_is_served_through_an_attack(tmp_path, capsys):
    with BusServer(tmp_path / "bus.db", "--body-timeout", "2") as bus:
        code = asyncio.run(run(bus.url, seconds=3, slow=50, flood=20))
        report = capsys.readouterr().out
        assert code == 0, report
        assert "0 failed" in report
        assert bus.get("/healthz").status_code == 200
        assert bus.stop() == 0
