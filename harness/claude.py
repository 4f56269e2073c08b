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
             timeout: float = 30, **payload_fields) -> HookResult:
    """Run the plugin's hook for `event` as Claude Code does. `options`: the plugin's
    options (bus_url, agent_name, token, channel, stop_hook); `spool`: the agent's spool
    root (AGENT_BUS_SPOOL, from the session's environment)."""
    env = {k: v for k, v in repo_env().items() if k not in AGENT_VARIABLES}
    env.update({option_variable(k): str(v) for k, v in options.items()})
    env.update(CLAUDE_PLUGIN_ROOT=str(PLUGIN), CLAUDE_PROJECT_DIR=cwd,
               AGENT_BUS_SPOOL=str(spool), AGENT_BUS_PYTHON=sys.executable)
    done = subprocess.run(hook_command(event), input=json.dumps(
        hook_payload(event, cwd, **payload_fields)).encode(), capture_output=True, env=env,
        cwd=cwd, timeout=timeout)
    return HookResult(done.returncode, done.stdout.decode(), done.stderr.decode())
