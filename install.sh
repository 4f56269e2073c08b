#!/usr/bin/env bash
# install.sh: from a fresh checkout to a working agent-bus, in one command.
#
#   ./install.sh               install (or upgrade) into your home directory
#   ./install.sh --dev         also the test tools (pytest, hypothesis, shellcheck)
#   ./install.sh --uninstall   remove the program; your messages, spools and config stay
#
# Where things go (all under your home, nothing system-wide):
#   ${XDG_DATA_HOME:-~/.local/share}/agent-bus/venv   the Python environment
#   ${XDG_DATA_HOME:-~/.local/share}/agent-bus/bin    the bus-* shell commands
#   ~/.local/bin/agent-bus, ~/.local/bin/bus-*          links to the commands
set -euo pipefail
umask 022

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
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
while [ $# -gt 0 ]; do
  case "$1" in
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
venv="$data_home/agent-bus/venv"
bindir="$HOME/.local/bin"

if [ "$uninstall" = 1 ]; then
  for link in "$bindir/agent-bus" "$bindir"/bus-*; do
    if [ -L "$link" ]; then
      rm -f "$link"
    fi
  done
  rm -rf "$venv" "$data_home/agent-bus/bin"
  say "agent-bus removed. Your data is untouched: ${XDG_STATE_HOME:-$HOME/.local/state}/agent-bus (messages, spools) and ~/.config/agent-bus (settings)."
  exit 0
fi

python=${PYTHON:-python3}
command -v "$python" >/dev/null 2>&1 || die "python3 is needed (3.11 or newer); install it with your package manager"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "python3 is too old: agent-bus needs 3.11 or newer"
"$python" -c 'import venv, ensurepip' 2>/dev/null \
  || die "python3 cannot make virtual environments; install python3-venv (Debian/Ubuntu: apt-get install python3-venv)"

for tool in curl jq; do
  command -v "$tool" >/dev/null 2>&1 \
    || say "note: $tool is not installed; the bin/bus-* shell commands need it (apt-get install $tool)"
done

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
for script in "$src"/bin/bus-*; do
  [ -f "$script" ] || continue
  name=$(basename "$script")
  install_file "$script" "$scripts/$name" 755
  ln -sfn "$scripts/$name" "$bindir/$name"
done

say "$("$venv/bin/agent-bus" --version) installed: $bindir/agent-bus"
case ":$PATH:" in
  *":$bindir:"*) ;;
  *) say "note: $bindir is not on your PATH; add it, e.g.: echo 'export PATH=\"\$HOME/.local/bin:\$PATH\"' >> ~/.bashrc" ;;
esac
