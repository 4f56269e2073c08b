#!/usr/bin/env bash
# install.sh: from a fresh checkout to a working agent-bus, in one command.
#
#   ./install.sh               install (or upgrade) into your home directory
#   ./install.sh --agent NAME  also write NAME's settings and spool folder (agent-bus
#                              init NAME; repeatable), ready for agent-bus@NAME
#   ./install.sh --dev         also the test tools (pytest, hypothesis, shellcheck, chromium,
#                              the Claude Code client)
#   ./install.sh --uninstall   stop and remove the program and its systemd units;
#                              your messages, spools and settings stay
#
# Where things go (all under your home, nothing system-wide):
#   ${XDG_DATA_HOME:-~/.local/share}/agent-bus/venv   the Python environment
#   ${XDG_DATA_HOME:-~/.local/share}/agent-bus/bin    the bus-* shell commands
#   ~/.local/bin/agent-bus, ~/.local/bin/bus-*          links to the commands
#   ${XDG_CONFIG_HOME:-~/.config}/systemd/user/        agent-bus@.service,
#                            agent-bus.target, agent-bus-server.service (user units)
#
# AGENT_BUS_VENV=DIR uses the agent-bus already installed in the Python environment
# DIR (pipx, a package, a test) instead: nothing is installed with pip, and the
# links and units point at DIR/bin/agent-bus. --uninstall then leaves DIR alone.
set -euo pipefail
umask 022

usage() {  # the comment block above, without its '#'
  sed -n '2,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p'
}

die() {
  printf 'install.sh: %s\n' "$*" >&2
  exit 1
}

say() {
  [ "$quiet" = 1 ] || printf '%s\n' "$*"
}

dev=0
quiet=0
uninstall=0
agents=()
while [ $# -gt 0 ]; do
  case "$1" in
    --agent)
      [ $# -ge 2 ] || die "--agent needs a name, e.g. --agent spark"
      agents+=("$2")
      shift ;;
    --agent=*) agents+=("${1#--agent=}") ;;
    --dev) dev=1 ;;
    --quiet|-q) quiet=1 ;;
    --uninstall) uninstall=1 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
  shift
done

src=$(cd "$(dirname "$0")" && pwd)
data_home=${XDG_DATA_HOME:-$HOME/.local/share}
config_home=${XDG_CONFIG_HOME:-$HOME/.config}
own_venv=1
venv="$data_home/agent-bus/venv"
if [ -n "${AGENT_BUS_VENV:-}" ]; then
  own_venv=0
  venv=$(cd "$AGENT_BUS_VENV" 2>/dev/null && pwd) \
    || die "AGENT_BUS_VENV=$AGENT_BUS_VENV is not a folder; point it at a Python environment with agent-bus installed, or unset it"
fi
bindir="$HOME/.local/bin"
unit_dir="$config_home/systemd/user"
# The user units install.sh owns; agent-bus-server.system.service is for /etc, by hand.
units=(agent-bus@.service agent-bus.target agent-bus-server.service)

user_manager_running() {  # can systemctl --user reach this user's service manager?
  command -v systemctl >/dev/null 2>&1 && systemctl --user show-environment >/dev/null 2>&1
}

no_user_manager_hint() {  # say what to run once a user manager is there
  if command -v systemctl >/dev/null 2>&1; then
    say "note: no systemd user manager is reachable (no login session, or XDG_RUNTIME_DIR unset),"
    say "      so systemd was not told. In a login session run: systemctl --user $1"
    say "      (for agents that run without anyone logged in: loginctl enable-linger \"\$USER\")"
  else
    say "note: systemd is not installed here; run the daemons yourself: agent-bus agent NAME"
  fi
}

if [ "$uninstall" = 1 ]; then
  # Stop and disable what runs from our units before their files go, so nothing keeps
  # running from a deleted program and no dangling link is left behind.
  enabled_agents=()
  for link in "$unit_dir"/agent-bus.target.wants/agent-bus@*.service; do
    [ -L "$link" ] && enabled_agents+=("$(basename "$link")")
  done
  if user_manager_running; then
    systemctl --user stop agent-bus.target 'agent-bus@*.service' agent-bus-server.service \
      || say "note: stopping the agent-bus units failed; see: systemctl --user status 'agent-bus*'"
    systemctl --user disable "${units[@]}" "${enabled_agents[@]}" >/dev/null 2>&1 || true
  fi
  for link in "$unit_dir"/*.wants/agent-bus*; do
    [ -L "$link" ] && rm -f "$link"
  done
  rmdir "$unit_dir/agent-bus.target.wants" 2>/dev/null || true
  for unit in "${units[@]}"; do
    rm -f "$unit_dir/$unit"
  done
  if user_manager_running; then
    systemctl --user daemon-reload
    systemctl --user reset-failed 'agent-bus*' 2>/dev/null || true
  fi
  for link in "$bindir/agent-bus" "$bindir"/bus-*; do
    if [ -L "$link" ]; then
      rm -f "$link"
    fi
  done
  if [ "$own_venv" = 1 ]; then
    rm -rf "$venv"
  fi
  rm -rf "$data_home/agent-bus/bin"
  say "agent-bus removed, with its systemd units. Your data is untouched: ${XDG_STATE_HOME:-$HOME/.local/state}/agent-bus (messages, spools), $config_home/agent-bus (settings) and any unit overrides (systemctl --user edit) in $unit_dir."
  exit 0
fi

for tool in curl jq; do
  command -v "$tool" >/dev/null 2>&1 \
    || say "note: $tool is not installed; the bin/bus-* shell commands need it (apt-get install $tool)"
done

if [ "$own_venv" = 1 ]; then
  python=${PYTHON:-python3}
  command -v "$python" >/dev/null 2>&1 || die "python3 is needed (3.11 or newer); install it with your package manager"
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "python3 is too old: agent-bus needs 3.11 or newer"
  "$python" -c 'import venv, ensurepip' 2>/dev/null \
    || die "python3 cannot make virtual environments; install python3-venv (Debian/Ubuntu: apt-get install python3-venv)"

  if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
  fi

  pip_quiet=(-q)
  [ "$quiet" = 1 ] && pip_quiet=(-q -q)
  "$venv/bin/python" -m pip install "${pip_quiet[@]}" --disable-pip-version-check --upgrade pip setuptools wheel >/dev/null
  target="$src"
  [ "$dev" = 1 ] && target="${src}[dev]"
  say "installing agent-bus and its dependencies"
  "$venv/bin/python" -m pip install "${pip_quiet[@]}" --disable-pip-version-check --upgrade "$target"
else
  [ "$dev" = 0 ] || die "--dev installs the test tools with pip; it cannot be used with AGENT_BUS_VENV"
  [ -x "$venv/bin/agent-bus" ] \
    || die "AGENT_BUS_VENV=$venv has no bin/agent-bus; install agent-bus there first, or unset AGENT_BUS_VENV"
  say "using the agent-bus installed in $venv (AGENT_BUS_VENV); nothing installed with pip"
fi

if [ "$dev" = 1 ] && ! command -v shellcheck >/dev/null 2>&1; then
  say "installing shellcheck (the tests check bin/ with it)"
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq shellcheck >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && apt-get install -y -qq shellcheck >/dev/null; } \
      || die "could not install shellcheck with apt-get; install it by hand"
  else
    die "shellcheck is missing; install it (Debian/Ubuntu: sudo apt-get install shellcheck) and run again"
  fi
fi

# The console's browser tests drive Debian's chromium (headless; no driver needed: they
# speak its DevTools protocol over a pipe). Debian/Ubuntu only, as root, like shellcheck.
if [ "$dev" = 1 ] && [ ! -x /usr/lib/chromium/chromium ] && ! command -v chromium >/dev/null 2>&1; then
  say "installing chromium (the console's browser tests run it headless)"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
      || die "could not install chromium with apt-get; install it by hand"
  else
    say "note: chromium is missing, so the console's browser tests will be skipped (under CI they fail); install it (Debian/Ubuntu: sudo apt-get install chromium)"
  fi
fi

# The Claude Code plugin's tests run the real client (claude plugin validate, marketplace
# add, install), from npm, pinned, under the data folder: nothing global is touched.
CLAUDE_CODE_VERSION=2.1.332
claude_dir=${XDG_DATA_HOME:-$HOME/.local/share}/agent-bus/claude
# The marker alone is not trusted: a client whose files are gone is installed again.
if [ "$dev" = 1 ] && { [ ! -x "$claude_dir/node_modules/.bin/claude" ] \
    || [ "$(cat "$claude_dir/version" 2>/dev/null)" != "$CLAUDE_CODE_VERSION" ]; }; then
  say "installing the Claude Code client $CLAUDE_CODE_VERSION from npm (the plugin's tests run it)"
  if command -v npm >/dev/null 2>&1; then
    mkdir -p "$claude_dir"
    npm install --prefix "$claude_dir" --no-audit --no-fund --loglevel=error \
        "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" >/dev/null \
      || die "could not install @anthropic-ai/claude-code with npm; install it by hand into $claude_dir"
    printf '%s\n' "$CLAUDE_CODE_VERSION" >"$claude_dir/version"
  else
    say "note: npm is missing, so the Claude Code plugin's tests will be skipped (under CI they fail); install it (Debian/Ubuntu: sudo apt-get install npm)"
  fi
fi

# The shell commands are copied (not linked to this checkout, which may move).
# Each finds its shared code in lib/ beside its own resolved path, so lib/ goes first.
install_file() {  # install_file SRC DEST MODE: replace DEST atomically
  local tmp
  tmp=$(mktemp "$(dirname "$2")/.$(basename "$2").XXXXXX")
  cp "$1" "$tmp"
  chmod "$3" "$tmp"
  mv -f "$tmp" "$2"
}
scripts="$data_home/agent-bus/bin"
mkdir -p "$bindir" "$scripts/lib"
ln -sfn "$venv/bin/agent-bus" "$bindir/agent-bus"
for lib in "$src"/bin/lib/*.sh; do
  [ -f "$lib" ] || continue
  install_file "$lib" "$scripts/lib/$(basename "$lib")" 644
done
# The secret guard's shapes and BIP-39 word list (bus_secret_refusal looks beside the library).
install_file "$src/busd/data/secret-shapes.json" "$scripts/lib/secret-shapes.json" 644
install_file "$src/busd/data/bip39-english.txt" "$scripts/lib/bip39-english.txt" 644
for script in "$src"/bin/bus-*; do
  [ -f "$script" ] || continue
  name=$(basename "$script")
  install_file "$script" "$scripts/$name" 755
  ln -sfn "$scripts/$name" "$bindir/$name"
done

# The systemd user units, their ExecStart= pointing at this install's agent-bus.
agent_bus="$venv/bin/agent-bus"
case "$agent_bus" in
  *[!A-Za-z0-9/._+@-]*)
    die "cannot write systemd units for $agent_bus: its path holds a space or a character systemd reads specially; install under a plainer path (XDG_DATA_HOME or AGENT_BUS_VENV)" ;;
esac
install_unit() {  # install_unit SRC DEST: DEST atomically, @AGENT_BUS@ in ExecStart= replaced
  local tmp line
  tmp=$(mktemp "$(dirname "$2")/.$(basename "$2").XXXXXX")
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
      ExecStart=*) line=${line//@AGENT_BUS@/$agent_bus} ;;
    esac
    printf '%s\n' "$line"
  done < "$1" > "$tmp"
  chmod 644 "$tmp"
  mv -f "$tmp" "$2"
}
mkdir -p "$unit_dir"
for unit in "${units[@]}"; do
  install_unit "$src/systemd/$unit" "$unit_dir/$unit"
done
if user_manager_running; then
  systemctl --user daemon-reload
  # Running daemons still run the program just replaced: restart them onto the new one.
  running=$(systemctl --user list-units --state=active --plain --no-legend \
    agent-bus-server.service 'agent-bus@*.service' | awk '{print $1}' | tr '\n' ' ')
  if [ -n "$running" ]; then
    systemctl --user try-restart agent-bus-server.service 'agent-bus@*.service'
    say "restarted on the new version: $running"
  fi
  say "systemd user units installed in $unit_dir and loaded"
else
  say "systemd user units installed in $unit_dir"
  no_user_manager_hint "daemon-reload"
fi

for name in "${agents[@]}"; do
  settings="$config_home/agent-bus/$name.env"
  if [ -e "$settings" ]; then
    say "keeping $settings as it is (agent-bus init $name --force replaces it)"
  elif [ "$quiet" = 1 ]; then
    "$agent_bus" init "$name" >/dev/null
  else
    "$agent_bus" init "$name"
  fi
done

say "$("$agent_bus" --version) installed: $bindir/agent-bus"
if [ "${#agents[@]}" = 0 ]; then
  say "next, for agent NAME: agent-bus init NAME && systemctl --user enable --now agent-bus@NAME"
fi
case ":$PATH:" in
  *":$bindir:"*) ;;
  *) say "note: $bindir is not on your PATH: run the commands by their path ($bindir/agent-bus serve), or add it, e.g.: echo 'export PATH=\"\$HOME/.local/bin:\$PATH\"' >> ~/.bashrc" ;;
esac
