"""The OpenAPI 3.1 document of every route this bus serves (GET /openapi.json).

A test compares it with the router, and schemathesis checks live replies against it.
"""
from __future__ import annotations

from typing import Any

NAME_PATTERN = r"^(?!\.+$)[A-Za-z0-9._-]{1,64}$"

NAME = {"type": "string", "pattern": NAME_PATTERN}
RECIPIENT = {"anyOf": [NAME, {"const": "*"}]}
CHANNEL_OR_ALL = {"anyOf": [NAME, {"const": "*"}]}
META = {"type": "object",
        "additionalProperties": {"type": ["string", "number", "boolean", "null"]}}
TIMESTAMP = {"type": "number"}
KEY = {"type": "string", "pattern": r"^[\x21-\x7e]{1,200}$"}
SIGNATURE = {"type": "string", "maxLength": 200, "description": "base64 Ed25519; see README Security"}


def OPTIONAL(schema: dict) -> dict:  # noqa: N802 - reads as a type in the tables below
    """A field that may also be null, which the bus treats as absent."""
    return {"anyOf": [schema, {"type": "null"}]}


SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error", "code"],
        "properties": {"error": {"type": "string"}, "code": {"type": "integer"},
                       "id": {"type": "integer"}, "ts": TIMESTAMP,
                       "retry_after": {"type": "integer"}},
    },
    "RapidSend": {
        "type": "object", "required": ["from", "to", "msg"],
        "properties": {
            "from": NAME, "to": RECIPIENT,
            "msg": {"type": "string", "maxLength": 65536,
                    "description": "at most 64 KiB of UTF-8"},
            "channel": OPTIONAL(NAME), "key": OPTIONAL(KEY), "meta": OPTIONAL(META),
            "signature": OPTIONAL(SIGNATURE),
            "signed_at": OPTIONAL({"type": "integer", "description": "milliseconds since 1970"}),
            "allow_secret": OPTIONAL({"type": "boolean"}),
        },
    },
    "ElipcSend": {
        "type": "object", "required": ["channel", "sender", "content"],
        "properties": {"channel": NAME, "sender": NAME,
                       "content": {"type": "string", "minLength": 1, "maxLength": 65536},
                       "key": OPTIONAL(KEY), "meta": OPTIONAL(META),
                       "signature": OPTIONAL(SIGNATURE),
                       "signed_at": OPTIONAL({"type": "integer"}),
                       "allow_secret": OPTIONAL({"type": "boolean"})},
    },
    "RapidAck": {
        "type": "object", "required": ["ok", "ts", "channel", "id"],
        "properties": {"ok": {"const": True}, "ts": TIMESTAMP, "channel": NAME,
                       "id": {"type": "integer"}, "duplicate": {"type": "boolean"}},
    },
    "ElipcAck": {
        "type": "object", "required": ["ok", "id"],
        "properties": {"ok": {"const": True}, "id": {"type": "integer"}},
    },
    "RapidMessage": {
        "type": "object", "required": ["ts", "from", "msg", "id", "to", "channel"],
        "properties": {"ts": TIMESTAMP, "from": NAME, "msg": {"type": "string"},
                       "id": {"type": "integer"}, "to": RECIPIENT, "channel": NAME,
                       "meta": META, "signed": {"type": "boolean"}},
    },
    "ElipcMessage": {
        "type": "object", "required": ["id", "sender", "content", "timestamp"],
        "properties": {"id": {"type": "integer"}, "sender": NAME, "content": {"type": "string"},
                       "timestamp": TIMESTAMP, "signed": {"type": "boolean"}},
    },
}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _query(name: str, schema: dict, required: bool = False, description: str = "") -> dict:
    return {"name": name, "in": "query", "required": required, "schema": schema,
            "description": description}


# A request that is not valid HTTP (a request line over 8 KiB, a bad header) is refused
# by the HTTP parser before the app sees it, in plain text naming the fault.
ERROR_RESPONSE = {
    "description": "an error from the table in busd/errors.py; plain text when the request "
                   "is not valid HTTP at all (e.g. a request line over 8 KiB)",
    "content": {"application/json": {"schema": _ref("Error")},
                "text/plain": {"schema": {"type": "string"}}},
}


def _operation(summary: str, ok: dict, parameters: list | None = None,
               body: dict | None = None) -> dict:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": {"description": "success", **ok},
                      "default": ERROR_RESPONSE},
    }
    if parameters:
        operation["parameters"] = parameters
    if body:
        operation["requestBody"] = {"required": True, **_json(body)}
    return operation


BOOL_TEXT = {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no"]}
STRINGS = {"type": "array", "items": {"type": "string"}}
AGENT_CARD = {
    "type": "object",
    "required": ["name", "description", "supportedInterfaces", "version", "capabilities",
                 "defaultInputModes", "defaultOutputModes", "skills", "url", "authentication"],
    "properties": {
        "name": {"type": "string"}, "description": {"type": "string"},
        "version": {"type": "string"}, "url": {"type": "string"},
        "supportedInterfaces": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["url", "protocolBinding", "protocolVersion"],
            "properties": {"url": {"type": "string"}, "protocolBinding": {"type": "string"},
                           "protocolVersion": {"type": "string"}}}},
        "capabilities": {"type": "object", "properties": {
            "streaming": {"type": "boolean"}, "pushNotifications": {"type": "boolean"}}},
        "defaultInputModes": STRINGS, "defaultOutputModes": STRINGS,
        "skills": {"type": "array", "items": {
            "type": "object", "required": ["id", "name", "description", "tags"],
            "properties": {"id": {"type": "string"}, "name": {"type": "string"},
                           "description": {"type": "string"}, "tags": STRINGS}}},
        "authentication": {"type": "object", "required": ["schemes"],
                           "properties": {"schemes": STRINGS}},
        "did": {"type": "string", "pattern": "^did:key:z"},
    },
}
OBJECT = {"type": "object"}
RECEIPT_STATE = {"enum": ["queued", "delivered", "filed", "read"]}
HANDOFF_REPORT = {"enum": ["verified", "mismatch", "not checked"]}
# What /status shows may also be `unreachable`: reported by daemons before "not checked".
HANDOFF_RESULT = {"enum": ["verified", "mismatch", "not checked", "unreachable"]}
HANDOFF_CHECKS = {"type": "object", "additionalProperties": HANDOFF_RESULT,
                  "description": "per recipient, what its daemon found on arrival"}
RECIPIENT_STATES = {"type": "object", "additionalProperties": RECEIPT_STATE}


def _text(media_type: str, description: str) -> dict:
    return {"description": description,
            "content": {media_type: {"schema": {"type": "string"}}}}


def _console_operation(summary: str, responses: dict, parameters: list | None = None,
                       body: dict | None = None) -> dict:
    """A console route: HTML, assets, redirects; its own responses besides errors."""
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {**responses,
                      "default": ERROR_RESPONSE},
    }
    if parameters:
        operation["parameters"] = parameters
    if body:
        operation["requestBody"] = body
    return operation


TO_CONSOLE = {"description": "to the console (GET /ui)",
              "headers": {"Location": {"schema": {"const": "/ui"}}}}
CONSOLE_MESSAGE = {
    "type": "object",
    "required": ["id", "ts", "from", "to", "channel", "first_line", "more", "state",
                 "recipients"],
    "properties": {"id": {"type": "integer"}, "ts": TIMESTAMP, "from": NAME, "to": RECIPIENT,
                   "channel": NAME, "first_line": {"type": "string"},
                   "more": {"type": "boolean", "description": "the body goes on"},
                   "signed": {"type": "boolean"}, "state": RECEIPT_STATE,
                   "recipients": RECIPIENT_STATES,
                   "handoff": {**HANDOFF_CHECKS, "description": "present on handoffs: the "
                               "checks reported so far (empty: none yet)"}},
}


def document(version: str) -> dict:
    paths = {
        "/send": {"post": _operation(
            "Send: an addressed message (rapid) or a channel broadcast (el-ipc)",
            _json({"anyOf": [_ref("RapidAck"), _ref("ElipcAck")]}),
            body={"oneOf": [_ref("RapidSend"), _ref("ElipcSend")]})},
        "/recv": {"get": _operation(
            "Receive messages for `to` with ts > since, oldest first; long-poll with block",
            _json({"type": "object", "required": ["messages", "now"],
                   "properties": {"messages": {"type": "array", "items": _ref("RapidMessage")},
                                  "now": TIMESTAMP}}),
            [_query("to", NAME, True), _query("since", {"type": "number"}),
             _query("block", BOOL_TEXT), _query("channel", CHANNEL_OR_ALL),
             _query("max", {"type": "integer", "minimum": 1},
                    description="a soft cap on the batch (default 100): more than 1000 is "
                                "served as 1000, and then `now` is the last message's ts"),
             _query("filed", BOOL_TEXT,
                    description="true from a daemon: since also says its files are durable")])},
        "/inbox": {"get": _operation(
            "Each queue's length per channel and recipient, read or not; a broadcast "
            "counts once under \"*\" (admin)",
            _json({"type": "object", "required": ["recipients", "now"],
                   "properties": {"recipients": {"type": "object", "additionalProperties": {
                       "type": "object", "additionalProperties": {"type": "integer"}}},
                       "now": TIMESTAMP}}))},
        "/healthz": {"get": _operation(
            "Liveness and the server's cursor-safe now",
            _json({"type": "object", "required": ["ok", "now"],
                   "properties": {"ok": {"const": True}, "now": TIMESTAMP}}))},
        "/messages": {"get": _operation(
            "el-ipc: unread messages on a channel; moves the agent's watermark past them",
            _json({"type": "array", "items": _ref("ElipcMessage")}),
            [_query("channel", NAME, True), _query("agent", NAME, True),
             _query("wait", BOOL_TEXT)])},
        "/channels": {"get": _operation(
            "el-ipc: channels with message counts, newest first (admin)",
            _json({"type": "array", "items": {
                "type": "object", "required": ["channel", "count", "last_message"],
                "properties": {"channel": NAME, "count": {"type": "integer"},
                               "last_message": TIMESTAMP}}}))},
        "/agents": {"get": _operation(
            "The roster: registered agents and every agent seen, online or not "
            "(identities and queues for admins)",
            _json({"type": "array", "items": {
                "type": "object", "required": ["name", "role", "online", "last_seen"],
                "properties": {"name": NAME, "role": {"type": "string"},
                               "identity": {"type": "string"},
                               "registered_by": {"type": ["string", "null"]},
                               "created_at": {"type": ["number", "null"]},
                               "registered": {"type": "boolean"},
                               "online": {"type": "boolean"},
                               "last_seen": {"type": ["number", "null"]},
                               "pending": {"type": "object",
                                           "additionalProperties": {"type": "integer"}}}}}))},
        "/status": {"get": _operation(
            "Receipt states of messages you sent: queued, delivered, filed, read (per "
            "recipient)",
            _json({"type": "object", "required": ["messages"], "properties": {
                "messages": {"type": "array", "items": {
                    "type": "object", "required": ["id", "state"],
                    "properties": {"id": {"type": "integer"},
                                   "state": {"enum": ["queued", "delivered", "filed",
                                                      "read", "unknown"]},
                                   "recipients": RECIPIENT_STATES,
                                   "handoff": HANDOFF_CHECKS}}}}}),
            [{"name": "id", "in": "query", "required": True, "style": "form", "explode": True,
              # Bounded like the ids the bus hands out, so 100 of them fit in a request line.
              "schema": {"type": "array", "items": {"type": "integer", "minimum": 1,
                                                    "maximum": 2 ** 63 - 1},
                         "minItems": 1, "maxItems": 100}}])},
        "/undelivered": {"get": _operation(
            "Dead letters: messages nobody fetched for `older` seconds, or sent to a name "
            "never seen (admin)",
            _json({"type": "object", "required": ["messages"], "properties": {
                "messages": {"type": "array", "items": {
                    "type": "object", "required": ["id", "to", "reason"]}}}}),
            [_query("older", {"type": "number", "minimum": 0})])},
        "/health": {"get": _operation(
            "el-ipc: status, an agent's pending count on a channel, secure mode",
            _json({"type": "object", "required": ["status", "pending", "secure_mode"],
                   "properties": {"status": {"const": "ok"}, "pending": {"type": "integer"},
                                  "secure_mode": {"type": "boolean"}}}),
            [_query("channel", NAME), _query("agent", NAME)])},
        "/register": {"post": _operation(
            "Register an agent's public key, signed by an operator (never a private key)",
            _json({"type": "object", "required": ["ok", "message"],
                   "properties": {"ok": {"const": True}, "message": {"type": "string"}}}),
            body={"type": "object",
                  "required": ["name", "public_key", "operator", "signature", "signed_at"],
                  "properties": {"name": NAME, "public_key": {"type": "string"},
                                 "identity": {"type": "string"}, "operator": NAME,
                                 "signature": {"type": "string"},
                                 "signed_at": {"type": "integer"}}})},
        "/.well-known/agent-card.json": {"get": _operation(
            "A2A v1.0 agent card, with el-ipc's url, authentication.schemes and (once an "
            "operator exists) the first operator's did:key",
            _json(AGENT_CARD))},
        "/metrics": {"get": _operation(
            "Prometheus metrics (admin)",
            {"content": {"text/plain": {"schema": {"type": "string"}}}})},
        "/openapi.json": {"get": _operation("This document", _json(OBJECT))},
        "/handoff-checks": {"post": _operation(
            "A recipient's daemon reports its check of a handoff on arrival (only a "
            "recipient of the message may)",
            _json({"type": "object", "required": ["ok"], "properties": {"ok": {"const": True}}}),
            body={"type": "object", "required": ["id", "agent", "result"],
                  "properties": {"id": {"type": "integer", "minimum": 1}, "agent": NAME,
                                 "result": HANDOFF_REPORT}})},
        "/read": {"post": _operation(
            "A recipient reports messages it was shown (to its model or its person): their "
            "state becomes read. Ids that are not its messages come back as unknown, unmarked",
            _json({"type": "object", "required": ["ok", "read", "unknown"],
                   "properties": {"ok": {"const": True},
                                  "read": {"type": "array", "items": {"type": "integer"}},
                                  "unknown": {"type": "array", "items": {"type": "integer"}}}}),
            body={"type": "object", "required": ["agent", "ids"],
                  "properties": {"agent": NAME, "ids": {
                      "type": "array", "minItems": 1, "maxItems": 1000,
                      "items": {"type": "integer", "minimum": 1}}}})},
        "/ui": {"get": _console_operation(
            "The operator console, a web page (admin; open mode on loopback). Without an "
            "admin credential, the login form, answered 401 (or 403 for a non-admin token)",
            {"200": _text("text/html", "the console"),
             "401": _text("text/html", "the login form: no or no valid credential"),
             "403": _text("text/html", "the login form: not an admin token")})},
        "/ui/console.js": {"get": _console_operation(
            "The console's script (no login needed: it is the same for everyone)",
            {"200": _text("text/javascript", "the script")})},
        "/ui/console.css": {"get": _console_operation(
            "The console's style sheet (no login needed)",
            {"200": _text("text/css", "the style sheet")})},
        "/ui/login": {"post": _console_operation(
            "Log the browser in to the console: an admin token in a form, kept in an HttpOnly, "
            "SameSite=Strict cookie for /ui",
            {"303": {**TO_CONSOLE, "description": "logged in (or open mode): to the console"},
             "401": _text("text/html", "the login form again: not a valid token"),
             "403": _text("text/html", "the login form again: not an admin token")},
            body={"required": True, "content": {"application/x-www-form-urlencoded": {
                "schema": {"type": "object", "required": ["token"],
                           "properties": {"token": {"type": "string"}}}}}})},
        "/ui/logout": {"post": _console_operation(
            "Log the browser out of the console (forget the cookie)",
            {"303": {**TO_CONSOLE, "description": "logged out: to the console's login"}})},
        "/ui/feed": {"get": _operation(
            "The console's data (admin): recent messages of every recipient with receipt "
            "states and handoff checks, the followed messages' states, the roster and the "
            "channels; with block=true held until something changes",
            _json({"type": "object",
                   "required": ["version", "messages", "states", "gone", "agents", "channels",
                                "auth", "now"],
                   "properties": {
                       "version": {"type": "string",
                                   "description": "pass back: the next blocking request "
                                                  "answers once anything changed"},
                       "messages": {"type": "array", "items": CONSOLE_MESSAGE},
                       "states": {"type": "object", "additionalProperties": {
                           "type": "object", "required": ["state", "recipients"],
                           "properties": {"state": RECEIPT_STATE,
                                          "recipients": RECIPIENT_STATES,
                                          "handoff": HANDOFF_CHECKS}}},
                       "gone": {"type": "array", "items": {"type": "integer"}},
                       "agents": {"type": "array", "items": {"type": "object"}},
                       "channels": {"type": "array", "items": {
                           "type": "object", "required": ["channel", "count", "last_message",
                                                          "pending"],
                           "properties": {"channel": NAME, "count": {"type": "integer"},
                                          "last_message": TIMESTAMP,
                                          "pending": {"type": "integer"}}}},
                       "auth": {"type": "boolean"}, "now": TIMESTAMP}}),
            [_query("after", {"type": "integer", "minimum": 0},
                    description="the newest message id the page has; absent: the newest ones"),
             _query("version", {"type": "string"}),
             _query("block", BOOL_TEXT), _query("max", {"type": "integer", "minimum": 1,
                                                        "maximum": 500}),
             _query("channel", NAME), _query("agent", NAME,
                                             description="messages from or to this agent"),
             _query("watch", {"type": "string", "pattern": r"^[0-9]{1,18}(,[0-9]{1,18}){0,199}$"},
                    description="message ids whose states to report, comma-separated")])},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "agent-bus", "version": version,
                 "description": "Both older agent-bus protocols (rapid, el-ipc) and native routes."},
        "paths": paths,
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
