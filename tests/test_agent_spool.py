"""The spool's rules on real files: the drop rule, the inbox file format, crash recovery of
inbox.log, and the `agent-bus drop` / `agent-bus inbox` commands."""
from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest

from busd import handoff
from busd.agent.inbox import (InboxWriter, format_inbox_file, header_value, load_state,
                              parse_inbox_file, read_header_value)
from busd.agent.spool import (BadDrop, Drop, SpoolLayout, is_being_written, is_ignored,
                              outbox_place, parse_drop)
from busd.framing import monitor_block
from harness.agents import AgentProcess, files_under, inbox_messages
from harness.bus import agent_bus_cmd, repo_env, wait_until

LIMIT = 64 * 1024


def parse(data: bytes, folder: str | None = "dell") -> Drop:
    return parse_drop(data, folder, "default", LIMIT)


# -- the drop rule ---------------------------------------------------------

def test_the_folder_names_the_recipient_and_the_body_is_the_whole_file():
    assert parse(b"hi\n\n") == Drop(to="dell", channel="default", body="hi\n\n")
    assert parse(b"", "*") == Drop(to="*", channel="default", body="")


def test_a_header_block_overrides_the_folder_and_adds_fields():
    drop = parse(b"---bus\nto: spark\nchannel: ops\nkey: k-1\nmeta.kind: verify\n"
                 b"meta.path: /a b/c\n---\nbody\n---\nmore")
    assert drop == Drop(to="spark", channel="ops", body="body\n---\nmore", key="k-1",
                        meta={"kind": "verify", "path": "/a b/c"})
    assert parse(b"---bus\nto: spark\n---").body == ""
    assert parse(b"---bus\n---\nx").to == "dell"


def test_only_an_exact_first_line_opens_a_header_block():
    for data in (b" ---bus\nto: x\n---\n", b"---bus \nto: x\n---\n", b"---bus\r\nto: x\r\n---\r\n",
                 b"hello\n---bus\nto: x\n---\n", b"---bus"):
        assert parse(data).body == data.decode()


@pytest.mark.parametrize("data, reason", [
    (b"---bus\nto: spark\nhello\n", "no closing line"),
    (b"---bus\nto spark\n---\n", "is not `name: value`"),
    (b"---bus\nfrom: spark\n---\n", "unknown header 'from'"),
    (b"---bus\nto: a\nto: b\n---\n", "given twice"),
    (b"---bus\nto:\n---\n", "has no value"),
    (b"---bus\nmeta.: x\n---\n", "meta.<field>"),
])
def test_malformed_header_blocks_are_bad_drops(data, reason):
    with pytest.raises(BadDrop, match="^malformed header block: .*" + reason):
        parse(data)


def test_bad_recipients_channels_keys_and_contents():
    with pytest.raises(BadDrop, match=r"^invalid recipient name 'bad name' \(from the folder"):
        parse(b"x", "bad name")
    with pytest.raises(BadDrop, match=r"^invalid recipient name '\.\.' \(in the to: header"):
        parse(b"---bus\nto: ..\n---\nx")
    with pytest.raises(BadDrop, match="^no recipient: "):
        parse(b"x", None)
    with pytest.raises(BadDrop, match="^invalid channel '\\*'"):
        parse(b"---bus\nchannel: *\n---\nx")
    with pytest.raises(BadDrop, match="^invalid key "):
        parse(b"---bus\nkey: has space\n---\nx")
    with pytest.raises(BadDrop, match="^binary: the file is not UTF-8 text \\(byte 1 is 0xff\\)"):
        parse(b"a\xff")
    with pytest.raises(BadDrop, match="^binary: the file holds a NUL byte at offset 2"):
        parse(b"ab\0")
    with pytest.raises(BadDrop, match="^too large: 65537 bytes"):
        parse(b"x" * (LIMIT + 1))
    assert parse(b"---bus\nmeta.n: 1\n---\n" + b"x" * LIMIT).body == "x" * LIMIT


def test_where_a_file_lies_in_the_outbox(tmp_path):
    outbox = str(tmp_path / "outbox")
    assert outbox_place(outbox, f"{outbox}/dell/note") == ("dell", "note")
    assert outbox_place(outbox, f"{outbox}/note") == (None, "note")
    assert outbox_place(outbox, f"{outbox}/*/note") == ("*", "note")
    assert outbox_place(outbox, f"{outbox}/dell/.note") is None
    assert outbox_place(outbox, f"{outbox}/.git/note") is None
    with pytest.raises(BadDrop, match="nested folder"):
        outbox_place(outbox, f"{outbox}/dell/sub/note")
    for name in (".x", "x.swp", "x~", "#x#", "x.tmp"):
        assert is_ignored(name), name
    for name in ("x", "x.txt", "#x", "x#", "tmp"):
        assert not is_ignored(name), name


def test_a_file_held_open_for_writing_is_seen_as_being_written(tmp_path):
    path = tmp_path / "f"
    with open(path, "wb") as handle:
        handle.write(b"half")
        # Another process's view: a child opens and asks, as the daemon would.
        probe = [*agent_bus_cmd()[:1], "-c",
                 "import sys; from busd.agent.spool import is_being_written as w; "
                 "print(w(sys.argv[1]))", str(path)]
        assert subprocess.run(probe, capture_output=True, env=repo_env(),
                              timeout=30).stdout.strip() == b"True"
    assert is_being_written(str(path)) is False


# -- the inbox file --------------------------------------------------------

def message(i: int, **extra) -> dict:
    return {"id": i, "ts": 1795000000.0 + i / 7, "from": "spark", "to": "dell",
            "channel": "default", "msg": f"body {i}\n\nline ✓", **extra}


def test_inbox_file_format_round_trips_headers_meta_and_body():
    meta = {"kind": "verify", "n": 3, "s": "3", "flag": True, "none": None, "text": " padded ",
            "multi": "a\nb", "quoted": '"q"', "weird key": 1}
    data = format_inbox_file(message(7, meta=meta))
    headers, body = parse_inbox_file(data)
    assert body == "body 7\n\nline ✓".encode()
    assert headers["id"] == "7" and float(headers["ts"]) == message(7)["ts"]
    assert headers["from"] == "spark" and headers["to"] == "dell"
    assert headers["meta"] == meta
    assert b"\nmeta.kind: verify\n" in data and b"\nmeta.s: \"3\"\n" in data
    for value in ("plain", "3", "true", "", " x", "a\tb", '"', "null", "1e5", "-"):
        assert read_header_value(header_value(value)) == value


def fresh_writer(layout: SpoolLayout) -> InboxWriter:
    writer = InboxWriter(layout, "default")
    writer.open()
    return writer


def log_text(layout: SpoolLayout) -> str:
    with open(layout.inbox_log, encoding="utf-8") as handle:
        return handle.read()


def expected_log(*numbers: int) -> str:
    return "".join(monitor_block(message(i)) for i in numbers)


@pytest.fixture
def layout(tmp_path) -> SpoolLayout:
    layout = SpoolLayout.for_agent(str(tmp_path), "dell")
    layout.create()
    return layout


def test_writer_files_each_message_once_and_logs_it_once(layout):
    writer = fresh_writer(layout)
    writer.write_batch({"messages": [message(1), message(2)]})
    writer.write_batch({"messages": [message(2), message(3)]})   # 2 again: below the cursor
    writer.close()
    assert [int(h["id"]) for h, _ in inbox_messages(layout)] == [1, 2, 3]
    assert log_text(layout) == expected_log(1, 2, 3)
    for name in os.listdir(layout.inbox):
        assert stat.S_IMODE(os.stat(os.path.join(layout.inbox, name)).st_mode) == 0o600
    assert load_state(layout.cursor).since == message(3)["ts"]


def crashed_after_first_batch(layout: SpoolLayout) -> tuple[bytes, int]:
    """Messages 1 and 2 filed and the cursor saved, then a batch of 3 and 4 fully done."""
    writer = fresh_writer(layout)
    writer.write_batch({"messages": [message(1), message(2)]})
    with open(layout.cursor, "rb") as handle:
        saved_cursor = handle.read()
    size = os.path.getsize(layout.inbox_log)
    writer.write_batch({"messages": [message(3), message(4)]})
    writer.close()
    return saved_cursor, size


def restart_with(layout: SpoolLayout, cursor: bytes) -> None:
    with open(layout.cursor, "wb") as handle:
        handle.write(cursor)
    writer = fresh_writer(layout)
    writer.write_batch({"messages": [message(3), message(4), message(5)]})
    writer.close()


def test_crash_after_the_log_before_the_cursor_writes_nothing_twice(layout):
    cursor, _ = crashed_after_first_batch(layout)
    restart_with(layout, cursor)
    assert len(inbox_messages(layout)) == 5
    assert log_text(layout) == expected_log(1, 2, 3, 4, 5)


def test_crash_after_the_files_before_the_log_logs_the_missing_blocks(layout):
    cursor, size = crashed_after_first_batch(layout)
    os.truncate(layout.inbox_log, size)
    restart_with(layout, cursor)
    assert len(inbox_messages(layout)) == 5
    assert log_text(layout) == expected_log(1, 2, 3, 4, 5)


def test_crash_mid_log_write_cuts_the_torn_block_and_writes_it_whole(layout):
    cursor, size = crashed_after_first_batch(layout)
    torn = size + len(monitor_block(message(3)).encode()) + 5
    os.truncate(layout.inbox_log, torn)
    restart_with(layout, cursor)
    assert log_text(layout) == expected_log(1, 2, 3, 4, 5)


def test_crash_between_two_files_files_the_second_once(layout):
    cursor, size = crashed_after_first_batch(layout)
    os.truncate(layout.inbox_log, size)
    [fourth] = [n for n in os.listdir(layout.inbox) if "-4-" in n]
    os.unlink(os.path.join(layout.inbox, fourth))
    with open(os.path.join(layout.inbox, "." + fourth + ".tmp"), "wb") as handle:
        handle.write(b"half a fi")  # the crash's leftover temp file
    restart_with(layout, cursor)
    assert [int(h["id"]) for h, _ in inbox_messages(layout)] == [1, 2, 3, 4, 5]
    assert log_text(layout) == expected_log(1, 2, 3, 4, 5)
    assert not [n for n in os.listdir(layout.inbox) if n.startswith(".")]


def test_a_rotated_log_is_reopened_and_no_old_block_is_repeated(layout):
    writer = fresh_writer(layout)
    writer.write_batch({"messages": [message(1)]})
    os.rename(layout.inbox_log, layout.inbox_log + ".1")
    writer.write_batch({"messages": [message(2)]})
    writer.close()
    assert log_text(layout) == expected_log(2)
    cursor_without_log = json.dumps({"since": 0, "channel": "default", "inbox_log_bytes": 10**6})
    with open(layout.cursor, "w") as handle:
        handle.write(cursor_without_log)
    writer = fresh_writer(layout)  # refetching everything files and logs nothing twice
    writer.write_batch({"messages": [message(1), message(2), message(3)]})
    writer.close()
    assert log_text(layout) == expected_log(2, 3)


@pytest.mark.parametrize("garbage", [b'{"since": 1', b"\xff\xfe not text", b'["since"]'])
def test_a_cursor_file_that_is_not_one_starts_over_and_files_nothing_twice(layout, garbage,
                                                                          caplog):
    writer = fresh_writer(layout)
    writer.write_batch({"messages": [message(1), message(2)]})
    writer.close()
    with open(layout.cursor, "wb") as handle:
        handle.write(garbage)
    with pytest.raises(ValueError, match="is not a cursor file"):
        load_state(layout.cursor)
    writer = fresh_writer(layout)   # logs why, and receives everything again
    assert writer.since == 0.0 and "is not a cursor file" in caplog.text
    writer.write_batch({"messages": [message(1), message(2), message(3)]})
    writer.close()
    assert [int(h["id"]) for h, _ in inbox_messages(layout)] == [1, 2, 3]
    assert log_text(layout) == expected_log(1, 2, 3)


def handoff_message(i: int, path: str) -> dict:
    return message(i, meta={"kind": "handoff", "files": 1, "sha256": "ab" * 32, "path": path,
                            "bytes": 8})


def test_check_entries_in_the_crashed_run_s_log_are_kept_and_nothing_is_written_twice(
        layout, tmp_path):
    """A check's entry lands between batches; a crash before the next batch's cursor
    leaves it in the unconfirmed end of inbox.log, among blocks filed again."""
    roots = (str(tmp_path),)
    writer = InboxWriter(layout, "default", roots=roots)
    writer.open()
    writer.write_batch({"messages": [message(1), handoff_message(2, str(tmp_path / "hits.csv"))]})
    [marker] = os.listdir(layout.checking)
    with open(layout.cursor, "rb") as handle:
        saved_cursor = handle.read()
    assert writer.record_check(marker, handoff.Check(handoff.MISMATCH, "its sha256 differs")) == 2
    writer.write_batch({"messages": [message(3), message(4)]})
    writer.close()
    before = log_text(layout)
    assert os.listdir(layout.checking) == []
    [(headers, _)] = [hb for hb in inbox_messages(layout) if hb[0]["id"] == "2"]
    assert (headers["handoff"], headers["handoff-reason"]) == ("mismatch", "its sha256 differs")

    with open(layout.cursor, "wb") as handle:
        handle.write(saved_cursor)
    writer = InboxWriter(layout, "default", roots=roots)
    writer.open()
    writer.write_batch({"messages": [message(3), message(4), message(5)]})
    writer.close()
    after = log_text(layout)
    assert after == before + monitor_block(message(5))
    assert after.count("handoff: checking (message 2)") == 1
    assert after.count("handoff check of message 2 ") == 1


def test_a_message_of_any_shape_is_filed_with_a_note_and_reads_back():
    odd = {"id": 9, "ts": 1795000000.5, "from": "x\nhandoff: verified", "to": ["dell"],
           "channel": None, "msg": {"not": "text"}, "meta": ["a", "list"], "signed": "yes"}
    headers, body = parse_inbox_file(format_inbox_file(odd))
    assert json.loads(body) == {"not": "text"}
    assert "handoff" not in headers and "signed" not in headers
    assert headers["from"] == '"x\\nhandoff: verified"'
    assert "msg is a dict" in headers["note"] and "meta is a list" in headers["note"]
    assert "from is " in headers["note"] and "channel is null" in headers["note"]
    with pytest.raises(ValueError):
        format_inbox_file({"id": "9", "ts": 1.0, "msg": "no id the bus would give"})


# -- the commands ----------------------------------------------------------

def run_cli(*args: str, stdin: bytes = b"", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(agent_bus_cmd(*args), input=stdin, capture_output=True,
                          env=repo_env(**env), timeout=60)


def test_drop_command_drops_atomically_and_the_daemon_sends_it_byte_exact(server, names,
                                                                          tmp_path):
    spark, dell = names("spark", "dell")
    spool = tmp_path / "spool"
    env = {"AGENT_BUS_SPOOL": str(spool), "AGENT_NAME": spark, "AGENT_BUS_URL": server.url}
    body = b"---bus\nto: somebody-else\n---\nnot a header: it is the body\n"
    dropped = run_cli("drop", dell, stdin=body, **env)
    assert dropped.returncode == 0, dropped.stderr
    path = dropped.stdout.decode().strip()
    layout = SpoolLayout.for_agent(str(spool), spark)
    assert os.path.dirname(path) == layout.outbox and os.path.exists(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert run_cli("drop", "bad name", stdin=b"x", **env).returncode == 2
    refused = run_cli("drop", dell, stdin=b"\xff", **env)
    assert refused.returncode == 2 and b"not UTF-8" in refused.stderr

    with AgentProcess(spark, spool, server.url) as sender, \
            AgentProcess(dell, spool, server.url) as receiver:
        wait_until(lambda: inbox_messages(receiver.layout), what="the message")
        [(headers, received)] = inbox_messages(receiver.layout)
        assert received == body

        listed = run_cli("inbox", **{**env, "AGENT_NAME": dell})
        assert listed.returncode == 0, listed.stderr
        [line] = listed.stdout.decode().splitlines()
        number, when, sender_name, preview = line.split("\t")
        assert number == headers["id"] and sender_name == spark and when.endswith("Z")
        assert preview == "---bus | to: somebody-else | --- | not a header: it is the body | "
        whole = run_cli("inbox", dell, "--read", number, **env)
        assert whole.stdout.startswith(f"id: {number}\n".encode()) and whole.stdout.endswith(body)
        only_body = run_cli("inbox", dell, "--read", number, "--body", **env)
        assert only_body.stdout == body
        missing = run_cli("inbox", dell, "--read", "999999", **env)
        assert missing.returncode == 1 and b"no message 999999 in " in missing.stderr
        assert sender.stop() == 0 and receiver.stop() == 0
    assert files_under(layout.outbox) == [] and len(files_under(layout.sent)) == 1


def test_drop_with_channel_goes_to_that_channel(server, names, tmp_path):
    spark, dell, channel = names("spark", "dell", "ops")
    spool = tmp_path / "spool"
    env = {"AGENT_BUS_SPOOL": str(spool), "AGENT_NAME": spark}
    assert run_cli("drop", dell, "--channel", channel, stdin=b"on ops", **env).returncode == 0
    with AgentProcess(spark, spool, server.url) as sender, \
            AgentProcess(dell, spool, server.url, "--channel", "*") as receiver:
        wait_until(lambda: inbox_messages(receiver.layout), what="the message")
        [(headers, received)] = inbox_messages(receiver.layout)
        assert headers["channel"] == channel and received == b"on ops"
        assert sender.stop() == 0 and receiver.stop() == 0


def test_a_torn_cursor_file_means_starting_over_without_filing_twice(layout):
    writer = fresh_writer(layout)
    writer.write_batch({"messages": [message(1), message(2)]})
    writer.close()
    with open(layout.cursor, "wb") as handle:
        handle.write(b'{"since": 17')
    writer = fresh_writer(layout)
    assert writer.since == 0.0
    writer.write_batch({"messages": [message(1), message(2), message(3)]})
    writer.close()
    assert len(inbox_messages(layout)) == 3
    assert log_text(layout) == expected_log(1, 2, 3)
