"""The agent card: what GET /.well-known/agent-card.json (and `agent-bus agent-card`)
says about this bus. One builder, whoever asks, so every way of reading it agrees.

It is an A2A v1.0 AgentCard -- `supportedInterfaces`, `capabilities`, `skills` and the
rest, with A2A's own field names and required fields -- and it keeps, beside them, the
fields el-ipc's clients read: `url`, `authentication.schemes` and, once an operator
exists, `did` (A2A allows fields it does not define).
"""
from __future__ import annotations

from . import signing

A2A_PROTOCOL_VERSION = "1.0"
# A2A names a binding it does not define by a URI (A2A v1.0, "custom protocol bindings").
# Ours is this bus's HTTP long-poll API: rapid's /send and /recv?block=true, el-ipc's
# /send and /messages?wait=true, described route by route in /openapi.json.
PROTOCOL_BINDING = "urn:agent-bus:binding:http-long-poll:v1"

DEFAULT_NAME = "agent-bus"
DEFAULT_DESCRIPTION = "A message bus for agents: addressed messages and channel broadcasts."

# el-ipc's authentication.schemes: what a request must carry. Signed sends once an
# operator exists (secure mode), a bearer token once tokens exist; "none" on an open
# bus, so a client never takes a claim of signatures for a bus that checks none.
SIGNATURE_SCHEME = "Ed25519Signature"
BEARER_SCHEME = "bearer"
OPEN_SCHEMES = ("none",)

SKILLS = (
    {"id": "send", "name": "Send a message",
     "description": "POST /send: an addressed message (from, to, msg) or a channel "
                    "broadcast (channel, sender, content).",
     "tags": ["messaging"],
     "inputModes": ["application/json"], "outputModes": ["application/json"]},
    {"id": "receive", "name": "Receive messages",
     "description": "GET /recv?to=NAME&since=TS&block=true (a since-cursor) or "
                    "GET /messages?channel=C&agent=A&wait=true (a per-agent watermark); "
                    "both long-poll and answer the moment a message is committed.",
     "tags": ["messaging", "long-poll"],
     "inputModes": ["application/json"], "outputModes": ["application/json"]},
)


def build(*, name: str, description: str, url: str, version: str, tokens: bool,
          operator_key: str | None) -> dict:
    """The card for a bus reached at `url`; `tokens`: bearer auth is on;
    `operator_key`: the first operator's public key (PEM), if one exists."""
    url = url.rstrip("/")
    card: dict = {
        "name": name,
        "description": description,
        "supportedInterfaces": [{"url": url, "protocolBinding": PROTOCOL_BINDING,
                                 "protocolVersion": A2A_PROTOCOL_VERSION}],
        "version": version,
        "documentationUrl": url + "/openapi.json",
        # Long-polling is how the binding above works, not an A2A capability.
        "capabilities": {"streaming": False, "pushNotifications": False},
        "defaultInputModes": ["text/plain", "application/json"],
        "defaultOutputModes": ["application/json"],
        "skills": [dict(skill) for skill in SKILLS],
        # el-ipc's fields.
        "url": url,
        "authentication": {"schemes": _schemes(tokens, operator_key is not None)},
    }
    if tokens:
        card["securitySchemes"] = {BEARER_SCHEME: {"httpAuthSecurityScheme": {
            "scheme": "Bearer",
            "description": "a per-agent token (agent-bus token create NAME)"}}}
        card["securityRequirements"] = [{"schemes": {BEARER_SCHEME: {"list": []}}}]
    if operator_key is not None:
        card["did"] = signing.did_key(operator_key)
    return card


def _schemes(tokens: bool, operator: bool) -> list[str]:
    required = ([SIGNATURE_SCHEME] if operator else []) + ([BEARER_SCHEME] if tokens else [])
    return required or list(OPEN_SCHEMES)
