"""The harness that tests/ and bench/ share: real components started as child processes
on loopback (a bus server, agent daemons, a private systemd user manager, a headless
Chromium), the load loops, and ways to wait on what they show.

It imports busd (the checkout it sits in) and nothing of tests/ or bench/: both import
it, neither imports the other. Put the repository root on sys.path to use it (pytest's
conftest and each bench script do)."""
