"""`python -m busd.cli_hook EVENT`: the Claude Code hooks' command (claude-code/hooks/).

Claude Code runs it on SessionStart, UserPromptSubmit, PostToolUse and (opt-in) Stop,
with the hook's JSON on stdin; it prints the hook's JSON answer (busd/hooks.py says
what the model sees). It is part of the command line (it reads the environment), kept
outside busd/cli/ so that the common answer, "nothing new", is given before the CLI
or the mailbox library is imported: hooks run on every prompt and tool call. Without
a daemon, "nothing new" is the bus's answer to one question asked over a plain socket
(client.nothing_waits), for an http:// bus; over https, and whenever that answer is
anything but "nothing", the full path asks through the bus client.

Settings: AGENT_BUS_URL, AGENT_NAME, AGENT_BUS_TOKEN, AGENT_BUS_CHANNEL, AGENT_BUS_SPOOL
as for every command (the plugin's launcher sets them from the plugin's options);
AGENT_BUS_STOP_HOOK=true (the `stop_hook` option) turns the Stop hook on.

A hook never fails the session: whatever goes wrong becomes one line of context (or,
for Stop, no block) and the exit code is 0.
"""
from __future__ import annotations

import os
import sys

EVENTS = ("SessionStart", "UserPromptSubmit", "PostToolUse", "Stop")
ON = ("1", "true", "yes", "on")
BUS_SECONDS = 3.0   # the most one request to the bus may take in a hook
PEEK_SECONDS = 1.0  # the most the fast path's question may take before the full path


def spool_root(environ) -> str:
    """AGENT_BUS_SPOOL, else ${XDG_STATE_HOME:-~/.local/state}/agent-bus: what
    cli.Env.spool_root is (tests/test_claude_hooks.py holds them equal)."""
    return environ.get("AGENT_BUS_SPOOL") or os.path.join(
        environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state"),
        "agent-bus")


def bus_settings(environ) -> tuple[str, str | None, str, str]:
    """(url, token, user agent, channel) as cli.Env reads them (tests/test_claude_hooks.py
    holds them equal), for the fast path's question to the bus."""
    from .client import DEFAULT_UA
    return (environ.get("AGENT_BUS_URL", ""), environ.get("AGENT_BUS_TOKEN") or None,
            environ.get("AGENT_BUS_UA") or DEFAULT_UA,
            environ.get("AGENT_BUS_CHANNEL") or "default")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    event = argv[0] if argv else ""
    stdin = sys.stdin.buffer.read()
    environ = os.environ
    if event not in EVENTS:
        print(f"agent-bus hook: the event must be one of {', '.join(EVENTS)}, got {event!r}",
              file=sys.stderr)
        return 0   # a wrong hooks.json still must not break the session
    if event == "Stop" and environ.get("AGENT_BUS_STOP_HOOK", "").lower() not in ON:
        return 0
    name = environ.get("AGENT_NAME", "")
    if event != "SessionStart" and name and "/" not in name and name not in (".", ".."):
        from .hooks import nothing_new
        url, token, user_agent, channel = bus_settings(environ)

        def bus_empty(since: float) -> bool:
            from .client import nothing_waits
            return bool(url) and nothing_waits(url, name, since=since, channel=channel,
                                               token=token, user_agent=user_agent,
                                               timeout=PEEK_SECONDS)
        try:
            if nothing_new(os.path.join(spool_root(environ), name), channel, bus_empty):
                return 0
        except Exception:  # noqa: BLE001 - the full path below answers, and tells what is wrong
            pass
    return _answer(event, stdin, environ)


def _answer(event: str, stdin: bytes, environ) -> int:
    import json

    try:
        text = _run(event, stdin, environ)
    except Exception as exc:  # noqa: BLE001 - a hook must never break the session
        text = None if event == "Stop" else f"agent-bus: the {event} hook failed: {_short(exc)}"
    if not text:
        return 0
    if event == "Stop":
        reply = {"decision": "block", "reason": text}
    else:
        reply = {"hookSpecificOutput": {"hookEventName": event, "additionalContext": text}}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
    return 0


def _run(event: str, stdin: bytes, environ) -> str | None:
    import json

    from .cli import CommandError, Env
    from .hooks import ClaudeHooks
    from .mailbox import MailboxError

    try:
        payload = json.loads(stdin.decode("utf-8")) if stdin.strip() else {}
    except ValueError:
        payload = {}
    env = Env.from_environ(environ)
    if not env.name:
        return (None if event == "Stop" else "agent-bus: no agent name is set, so no message "
                "is shown: set the plugin's agent_name option (or AGENT_NAME).")
    if not env.url:
        return (None if event == "Stop" else "agent-bus: no bus URL is set, so no message is "
                "shown: set the plugin's bus_url option (or AGENT_BUS_URL).")
    try:
        mailbox = env.mailbox(env.name, env.reading_channel(None))
        # A bus that does not answer must not hold up every prompt and tool call.
        mailbox.connect = lambda: env.client(timeout=BUS_SECONDS)
        hooks = ClaudeHooks(mailbox, env.url)
        try:
            if event == "SessionStart":
                return hooks.session_start()
            if event == "Stop":
                active = isinstance(payload, dict) and payload.get("stop_hook_active") is True
                return hooks.stop(active)
            return hooks.new_messages()
        finally:
            mailbox.close()
    except (CommandError, MailboxError) as exc:
        return None if event == "Stop" else f"agent-bus: {_short(exc)}"


def _short(exc: Exception, limit: int = 200) -> str:
    """The error as one line of context: its words may come from the bus (framing.one_line)."""
    from .framing import one_line
    return one_line(exc, limit) or type(exc).__name__


if __name__ == "__main__":
    raise SystemExit(main())
