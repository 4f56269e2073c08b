"""Make the README's picture of the operator console: a real bus, real daemons, a real
Chromium. Run from the checkout:

    python -m tests.console_screenshot docs/console.png
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import requests

from harness.agents import AgentProcess
from harness.browser import Browser, wait_in_page
from harness.bus import BusServer, agent_bus_cmd, repo_env


def main(out: str) -> int:
    with tempfile.TemporaryDirectory(prefix="agent-bus-shot-") as tmp:
        bus = BusServer(os.path.join(tmp, "bus.db"), "--hold", "5", "--online-window", "30")
        bus.start()
        names = ("spark", "dell", "hopper", "lovelace", "ops")
        tokens = {}
        for name in names:
            made = subprocess.run(agent_bus_cmd("token", "create", name, "--db", bus.db),
                                  capture_output=True, env=repo_env(), check=True)
            tokens[name] = made.stdout.decode().strip()
        admin = subprocess.run(agent_bus_cmd("token", "create", "boss", "--admin", "--db", bus.db),
                               capture_output=True, env=repo_env(), check=True).stdout.decode().strip()
        spool = os.path.join(tmp, "spool")
        shared = os.path.join(tmp, "shared")
        os.makedirs(shared)
        daemons = {name: AgentProcess(name, spool, bus.url, AGENT_BUS_TOKEN=tokens[name],
                                      AGENT_BUS_SHARED=shared)
                   for name in ("spark", "dell", "hopper", "lovelace")}
        try:
            for daemon in daemons.values():
                daemon.start()
            daemons["lovelace"].stop()   # seen a moment ago, offline now

            def send(sender, to, text, channel="default"):
                answer = requests.post(bus.url + "/send", timeout=10,
                                       headers={"Authorization": f"Bearer {tokens[sender]}"},
                                       json={"from": sender, "to": to, "msg": text,
                                             "channel": channel})
                answer.raise_for_status()
                return answer.json()

            def handoff(sender, to, path):
                done = subprocess.run(agent_bus_cmd("handoff", "--to", to, path),
                                      capture_output=True, check=True,
                                      env=repo_env(AGENT_BUS_URL=bus.url, AGENT_NAME=sender,
                                                   AGENT_BUS_TOKEN=tokens[sender]))
                return done.stdout

            hits = os.path.join(shared, "hits.csv")
            with open(hits, "w") as handle:
                handle.write("chr1,1204,A>G\nchr2,88120,C>T\nchr7,5530,G>A\nchr9,771,T>C\n")
            results = os.path.join(shared, "results.parquet")
            with open(results, "wb") as handle:
                handle.write(os.urandom(4096))

            send("spark", "dell", "T1 verify done: 4/4 hits checked")
            handoff("spark", "dell", hits)
            send("dell", "spark", "on it: starting T2 with hits.csv\n(ETA 20 min)")
            send("ops", "*", "deploy window opens at 14:00Z; hold merges until then",
                 channel="ops")
            daemons["dell"].stop()
            handoff("hopper", "dell", results)
            with open(results, "ab") as handle:
                handle.write(b"changed after the handoff")
            daemons["dell"].start()
            send("hopper", "spark", "build 1482 green, artefacts in /shared/builds",
                 channel="builds")
            send("ops", "lovelace", "please rerun T3 when you are back")
            send("spark", "hopper", "thanks, pulling 1482 now")

            with Browser(width=1360, height=600) as browser:
                browser.navigate(bus.url + "/ui")
                browser.evaluate(f"document.getElementById('token').value = '{admin}';"
                                 "document.querySelector('form').submit(); true")
                browser.wait_for_event("Page.loadEventFired")
                settled = ("[...document.querySelectorAll('#feed tr')].length === 8 && "
                           "[...document.querySelectorAll('#feed td.handoff .badge')]"
                           ".filter((b) => b.textContent !== 'no report').length === 2")
                if not browser.evaluate(wait_in_page(settled, 15000)):
                    print("the console did not settle", file=sys.stderr)
                    return 1
                # Let the last receipts land, and the highlight of fresh rows fade.
                time.sleep(2.5)
                browser.screenshot(out)
            for daemon in daemons.values():
                daemon.stop()
        finally:
            for daemon in daemons.values():
                daemon.kill()
            bus.stop()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/console.png"))
