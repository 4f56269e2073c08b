"""The Claude Code plugin for tests and benchmarks: the real client from npm, and each
hook command run exactly as Claude Code runs it.

Claude Code runs a plugin hook's command (exec form: `command` and `args`, with
${CLAUDE_PLUGIN_ROOT} replaced) with the hook's JSON on stdin, its own environment plus
CLAUDE_PLUGIN_ROOT, CLAUDE_PROJECT_DIR and one CLAUDE_PLUGIN_OPTION_<KEY> per option
(the key upper-cased, anything but letters, digits and _ made _), and reads the JSON
the command prints.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from .bus import REPO, repo_env

PLUGIN = REPO / "claude-code"
HOOKS_FILE = PLUGIN / "hooks" / "hooks.json"
# Where install.sh --dev puts the pinned client.
CLAUDE = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") \
    / "agent-bus" / "claude" / "node_modules" / ".bin" / "claude"
# What the session's environment must not leak into a hook's: the plugin's options are
# the settings under test.
AGENT_VARIABLES = ("AGENT_BUS_URL", "AGENT_NAME", "AGENT_BUS_TOKEN", "AGENT_BUS_CHANNEL",
                   "AGENT_BUS_STOP_HOOK", "AGENT_BUS_KEY", "AGENT_BUS_SPOOL")


def claude_env(home: str | Path) -> dict[str, str]:
    """The environment for the real client in a temporary HOME, with no network use."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAUDE", "ANTHROPIC"))}
    env.update(HOME=str(home), CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
               XDG_CONFIG_HOME=str(Path(home) / ".config"))
    return env


def option_variable(key: str) -> str:
    return "CLAUDE_PLUGIN_OPTION_" + re.sub(r"[^A-Za-z0-9_]", "_", key).upper()


def hook_command(event: str) -> list[str]:
    """The argv of the plugin's command for `event`, as Claude Code builds it."""
    hooks = json.loads(HOOKS_FILE.read_text())["hooks"][event]
    [group] = hooks
    [hook] = group["hooks"]
    root = str(PLUGIN)
    return [part.replace("${CLAUDE_PLUGIN_ROOT}", root)
            for part in [hook["command"], *hook.get("args", [])]]


@dataclass
class HookResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def reply(self) -> dict | None:
        return json.loads(self.stdout) if self.stdout.strip() else None

    @property
    def context(self) -> str | None:
        """The additionalContext the hook gave, or None."""
        reply = self.reply
        return None if reply is None else reply["hookSpecificOutput"]["additionalContext"]


def hook_payload(event: str, cwd: str, **fields) -> dict:
    """The JSON Claude Code writes on a hook's stdin (its documented common fields)."""
    payload = {"session_id": str(uuid.uuid4()), "transcript_path": f"{cwd}/transcript.jsonl",
               "cwd": cwd, "permission_mode": "default", "hook_event_name": event}
    if event == "UserPromptSubmit":
        payload["prompt"] = fields.pop("prompt", "go on")
    elif event == "PostToolUse":
        payload.update(tool_name="Bash", tool_input={"command": "ls"},
                       tool_response={"stdout": "", "stderr": "", "interrupted": False},
                       tool_use_id="toolu_" + uuid.uuid4().hex[:20])
    elif event == "Stop":
        payload["stop_hook_active"] = fields.pop("stop_hook_active", False)
    elif event == "SessionStart":
        payload["source"] = "startup"
    payload.update(fields)
    return payload


def run_hook(event: str, options: dict[str, str], *, cwd: str, spool: str | Path,
             timeout: float = 30, session_env: dict[str, str] | None = None,
             **payload_fields) -> HookResult:
    """Run the plugin's hook for `event` as Claude Code does. `options`: the plugin's
    options (bus_url, agent_name, token, channel, stop_hook); `spool`: the agent's spool
    root (AGENT_BUS_SPOOL, from the session's environment); `session_env`: more of the
    session's environment (AGENT_BUS_URL and the like, the options' fallbacks)."""
    env = {k: v for k, v in repo_env().items() if k not in AGENT_VARIABLES}
    env.update(session_env or {})
    env.update({option_variable(k): str(v) for k, v in options.items()})
    env.update(CLAUDE_PLUGIN_ROOT=str(PLUGIN), CLAUDE_PROJECT_DIR=cwd,
               AGENT_BUS_SPOOL=str(spool), AGENT_BUS_PYTHON=sys.executable)
    done = subprocess.run(hook_command(event), input=json.dumps(
        hook_payload(event, cwd, **payload_fields)).encode(), capture_output=True, env=env,
        cwd=cwd, timeout=timeout)
    return HookResult(done.returncode, done.stdout.decode(), done.stderr.decode())


class StandInAPI:
    """A loopback stand-in for the Anthropic Messages API, so the real client can run a
    session (`claude -p`) here with no network: every request is kept (`requests`) and
    answered with a one-word assistant turn, streamed when asked. Claude Code reaches it
    through ANTHROPIC_BASE_URL."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        import threading

        self.requests: list[tuple[str, dict]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self._reply(404, b'{"type":"error","error":{"type":"not_found_error",'
                                 b'"message":"not here"}}')

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    body = {}
                api.requests.append((self.path, body))
                if not self.path.startswith("/v1/messages") or "count_tokens" in self.path:
                    self._reply(200, b'{"input_tokens": 10}')
                    return
                message = {"id": "msg_standin", "type": "message", "role": "assistant",
                           "model": body.get("model", "claude"), "content": [],
                           "stop_reason": None, "stop_sequence": None,
                           "usage": {"input_tokens": 10, "output_tokens": 1}}
                if not body.get("stream"):
                    done = {**message, "content": [{"type": "text", "text": "ok"}],
                            "stop_reason": "end_turn"}
                    self._reply(200, json.dumps(done).encode())
                    return
                events = [
                    ("message_start", {"type": "message_start", "message": message}),
                    ("content_block_start", {"type": "content_block_start", "index": 0,
                                             "content_block": {"type": "text", "text": ""}}),
                    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "text_delta", "text": "ok"}}),
                    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                    ("message_delta", {"type": "message_delta",
                                       "delta": {"stop_reason": "end_turn",
                                                 "stop_sequence": None},
                                       "usage": {"output_tokens": 1}}),
                    ("message_stop", {"type": "message_stop"})]
                data = "".join(f"event: {name}\ndata: {json.dumps(payload)}\n\n"
                               for name, payload in events).encode()
                self._reply(200, data, "text/event-stream")

            def _reply(self, status: int, data: bytes,
                       content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="standin-api",
                                       daemon=True)

    def __enter__(self) -> "StandInAPI":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def texts(self) -> list[str]:
        """Every text the client sent the model, in the order sent (messages and system)."""
        found: list[str] = []

        def walk(value) -> None:
            if isinstance(value, str):
                found.append(value)
            elif isinstance(value, list):
                for item in value:
                    walk(item)
            elif isinstance(value, dict):
                for key in ("text", "content", "system", "messages"):
                    if key in value:
                        walk(value[key])
        for path, body in self.requests:
            if path.startswith("/v1/messages") and "count_tokens" not in path:
                walk(body)
        return found
