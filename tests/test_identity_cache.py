"""The server keeps its answers to "is auth on?" and "is secure mode on?" (asked on every
request) instead of asking the database each time; a change to tokens or keys made by
another process (the operator's `agent-bus token create --db`, `operator seed --db`)
must still take effect for the next request, on SQLite and on PostgreSQL."""
from __future__ import annotations

import subprocess

from busd import errors
from harness.bus import BusServer, agent_bus_cmd, repo_env


def cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(agent_bus_cmd(*args), capture_output=True, env=repo_env(),
                            timeout=30)
    assert result.returncode == 0, result.stderr
    return result


def send(bus: BusServer, headers: dict | None = None):
    return bus.post("/send", json={"from": "alice", "to": "bob", "msg": "hi"},
                    headers=headers or {}, timeout=10)


def test_a_token_another_process_creates_turns_auth_on_for_the_next_request(own_server):
    bus = own_server
    # The open bus answers, many times over: its answer to "is auth on?" is kept.
    for _ in range(20):
        assert bus.get("/recv?to=bob", timeout=10).status_code == 200
        assert send(bus).status_code == 200
    token = cli("token", "create", "alice", "--db", bus.db).stdout.decode().strip()
    refused = bus.get("/recv?to=bob", timeout=10)
    assert refused.status_code == 401 and refused.json()["code"] == errors.UNAUTHENTICATED.code
    assert send(bus).status_code == 401
    assert send(bus, {"Authorization": f"Bearer {token}"}).status_code == 200
    # Revoking the last token opens the bus again, as at the start.
    cli("token", "revoke", "alice", "--db", bus.db)
    assert send(bus).status_code == 200


def test_an_operator_another_process_seeds_turns_secure_mode_on_for_the_next_send(own_server):
    bus = own_server
    for _ in range(20):
        assert send(bus).status_code == 200
    cli("operator", "seed", "ops", "--db", bus.db)
    refused = send(bus)
    assert refused.json()["code"] == errors.SIGNATURE_REQUIRED.code, refused.text
