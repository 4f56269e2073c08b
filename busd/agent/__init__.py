"""The per-agent daemon: one folder is an agent's mailbox (spool/README.md).

spool    the folder's layout, the drop rule, and the names of the files in it
outbox   watches outbox/ and sends each dropped file exactly once
inbox    long-polls the bus and files every message in inbox/ and inbox.log
daemon   wires those together (and busd/notify.py's sd_notify): `agent-bus agent NAME`
"""
