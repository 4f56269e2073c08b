# shellcheck shell=bash disable=SC2034  # the variables are for the scripts that source this
# bin/lib/agent-bus.sh: what every bin/bus-* script shares. Sourced, never run.
#
# The scripts mirror the `agent-bus` commands with nothing but bash, curl (7.55 or
# newer) and jq (1.6 or newer): same environment, same output bytes, same exit codes.

readonly EXIT_OK=0
readonly EXIT_REFUSED=1        # the bus refused the request (a 4xx other than 429)
readonly EXIT_USAGE=2          # wrong arguments or configuration
readonly EXIT_UNREACHABLE=3    # the bus could not be reached, or failed (network, 5xx, 429)

bus_prog=${0##*/}

die() {  # die CODE MESSAGE...: one line on stderr, then exit CODE
  local code=$1
  shift
  printf '%s: %s\n' "$bus_prog" "$*" >&2
  exit "$code"
}

bus_usage_error() {
  die "$EXIT_USAGE" "$* (see $bus_prog -h)"
}

# The environment, read as `agent-bus` reads it (busd/cli/__init__.py, Env).
bus_url=${AGENT_BUS_URL:-}
while [ "${bus_url%/}" != "$bus_url" ]; do bus_url=${bus_url%/}; done
bus_name=${AGENT_NAME:-}
bus_channel=${AGENT_BUS_CHANNEL:-default}
bus_token=${AGENT_BUS_TOKEN:-}
bus_ua=${AGENT_BUS_UA:-Mozilla/5.0}
bus_ca=${AGENT_BUS_CA:-}
bus_state_home=${XDG_STATE_HOME:-$HOME/.local/state}
bus_cursor_dir=${AGENT_BUS_STATE_DIR:-$bus_state_home/agent-bus/cursors}
bus_listen_dir=${AGENT_BUS_LISTEN_DIR:-$bus_state_home/agent-bus/listen}
case "${AGENT_BUS_NO_CURSOR:-}" in
  ""|0) bus_no_cursor=0 ;;
  *) bus_no_cursor=1 ;;
esac

# jq definitions every script prepends to its filter.
#   py_float     a number as Python's repr(float) writes it: jq already writes the
#                shortest round-trip digits, Python adds ".0" to whole numbers. Both
#                agree in the range timestamps live in, so cursor files written by
#                either tool are identical (tests/test_shell.py checks the round trip).
#   py_json      json.dumps(value) with Python's defaults: ", " and ": " separators,
#                non-ASCII as \u escapes. Numbers under the keys "ts" and "now" are
#                floats on the wire and keep their ".0"; others are written as jq does.
#   monitor_block, summary_line, agents_table: the formats of busd/client.py,
#                busd/listener.py and busd/cli/directory.py.
# shellcheck disable=SC2016  # jq's $variables, not the shell's
BUS_JQ='
def py_float: tostring | if (index(".") or index("e") or index("n")) then . else . + ".0" end;
def hex4: [(. / 4096 | floor) % 16, (. / 256 | floor) % 16, (. / 16 | floor) % 16, . % 16]
  | map("0123456789abcdef"[.:. + 1]) | add;
def py_ascii: [explode[] | if . < 128 then [.] | implode
    elif . < 65536 then "\\u" + hex4
    else (. - 65536) as $c
      | "\\u" + (55296 + ($c / 1024 | floor) | hex4) + "\\u" + (56320 + $c % 1024 | hex4)
    end] | add // "";
def py_json:
  def w($key):
    if type == "object" then
      "{" + ([to_entries[] | (.key | tojson | py_ascii) + ": " + (.key as $k | .value | w($k))]
             | join(", ")) + "}"
    elif type == "array" then "[" + (map(w(null)) | join(", ")) + "]"
    elif type == "number" and ($key == "ts" or $key == "now") then py_float
    elif type == "string" then tojson | py_ascii
    else tojson end;
  w(null);
def one_line($sep): split("\n") | join($sep) | split("\r") | join(" ") | split("\t") | join(" ");
def monitor_block: "[\(.ts | floor | strftime("%H:%M:%S"))Z] from \(.from):\n\(.msg // "")\n---";
def summary_line: "\(.ts | py_float)\t\(.from)\t\(.msg // "" | tostring | one_line(" | ") | .[0:120])";
def next_since($since): [$since, (.now | numbers), (.messages[]?.ts | numbers)] | max | py_float;
def agents_table:
  def cell($field):
    if . == null or . == "" or . == {} then "-"
    elif $field == "online" then (if . then "yes" else "no" end)
    elif $field == "last_seen" and type == "number" then floor | strftime("%Y-%m-%dT%H:%M:%SZ")
    elif $field == "pending" then to_entries | map("\(.key):\(.value)") | join(",")
    else tostring | one_line(" ") end;
  def pad($width): . + ([range(length; $width)] | map(" ") | add // "");
  ["name", "online", "last_seen", "pending", "role", "identity"] as $fields
  | [["NAME", "ONLINE", "LAST SEEN", "PENDING", "ROLE", "IDENTITY"]]
    + map(. as $agent | $fields | map(. as $field | $agent[$field] | cell($field)))
  | . as $rows
  | [range(0; 5) as $i | $rows | map(.[$i] | length) | max] as $widths
  | $rows[] | [range(0; 5) as $i | .[$i] | pad($widths[$i])] + [.[5]] | join("  ");
'

bus_work=""
bus_term_status=143    # the followers set 0: for them SIGTERM is the way to stop, as in Python
bus_child_pid=""
bus_pending_tmp=""

bus_cleanup() {
  if [ -n "$bus_child_pid" ]; then kill "$bus_child_pid" 2>/dev/null || true; fi
  if [ -n "$bus_pending_tmp" ]; then rm -f -- "$bus_pending_tmp"; fi
  if [ -n "$bus_work" ]; then rm -rf -- "$bus_work"; fi
}

# bus_start: check the tools, make the private work folder, clean up on any exit.
bus_start() {
  local tool
  for tool in ${bus_tools:-curl jq}; do
    command -v "$tool" >/dev/null 2>&1 \
      || die "$EXIT_USAGE" "$tool is needed and not installed (Debian/Ubuntu: apt-get install $tool)"
  done
  trap bus_cleanup EXIT
  # Without these, a signal would end bash without running the EXIT trap.
  trap 'exit 129' HUP
  trap 'exit 130' INT
  trap 'exit "$bus_term_status"' TERM
  bus_work=$(mktemp -d "${TMPDIR:-/tmp}/agent-bus.XXXXXX") \
    || die "$EXIT_USAGE" "cannot make a temporary folder in ${TMPDIR:-/tmp}; set TMPDIR to a writable folder"
  if [ -n "$bus_ca" ] && [ ! -r "$bus_ca" ]; then
    die "$EXIT_USAGE" "AGENT_BUS_CA=$bus_ca cannot be read; point it at the PEM file of the CA that signed the bus's certificate"
  fi
  if [ -n "$bus_token" ]; then
    case "$bus_token" in
      *[[:cntrl:]]*) die "$EXIT_USAGE" "AGENT_BUS_TOKEN holds a control character; set it to the token alone" ;;
    esac
    # A header file keeps the token out of `ps`.
    printf 'Authorization: Bearer %s\n' "$bus_token" >"$bus_work/auth-header"
  fi
}

bus_require_url() {
  [ -n "$bus_url" ] \
    || die "$EXIT_USAGE" "AGENT_BUS_URL is not set; export it, for example AGENT_BUS_URL=http://127.0.0.1:9876"
}

bus_require_name() {  # bus_require_name [GIVEN] [HOW]: the agent name, or a usage error
  bus_agent=${1:-$bus_name}
  [ -n "$bus_agent" ] || die "$EXIT_USAGE" "no agent name: set AGENT_NAME or pass ${2:-NAME}"
}

# Run a command in the background and wait for it, so that a signal is handled at
# once instead of after a 25-second long-poll; bus_cleanup stops the command.
bus_wait_for() {
  "$@" &
  bus_child_pid=$!
  local status=0
  wait "$bus_child_pid" || status=$?
  bus_child_pid=""
  return "$status"
}

bus_valid_name() {  # 1-64 characters of A-Z a-z 0-9 . _ -, not only dots (busd/model.py)
  local LC_ALL=C
  [[ $1 =~ ^[A-Za-z0-9._-]{1,64}$ && $1 =~ [^.] ]]
}

bus_header_value() {  # VALUE as the daemon reads it back from a header line, or fail
  local value=$1
  case "$value" in *$'\n'*) return 1 ;; esac
  value=${value#"${value%%[![:space:]]*}"}
  printf '%s' "${value%"${value##*[![:space:]]}"}"
}

bus_uri() {  # bus_uri VALUE: VALUE encoded for a URL query
  jq -rn --arg v "$1" '$v | @uri'
}

# bus_http PATH OUT [BODY_FILE] [MAX_SECONDS]: one request to the bus, a POST of
# BODY_FILE when given; the reply body lands in OUT. Returns 0 (a 2xx with a JSON
# body), EXIT_REFUSED (a 4xx other than 429) or EXIT_UNREACHABLE (network error,
# timeout, 5xx, 429, a reply that is not JSON), with bus_error saying what went wrong
# and bus_retry_after the server's Retry-After in whole seconds, if it sent one.
bus_http() {
  local path=$1 out=$2 body=${3:-} max_seconds=${4:-15}
  local -a args=(-sS -g -o "$out" -w '%{http_code}' -D "$bus_work/reply-headers"
                 -A "$bus_ua" --connect-timeout 15 --max-time "$max_seconds")
  if [ -n "$bus_token" ]; then args+=(-H "@$bus_work/auth-header"); fi
  if [ -n "$bus_ca" ]; then args+=(--cacert "$bus_ca"); fi
  if [ -n "$body" ]; then args+=(-H 'Content-Type: application/json' --data-binary "@$body"); fi
  bus_error=""
  bus_retry_after=""
  : >"$bus_work/reply-headers"
  local curl_status=0
  bus_wait_for curl "${args[@]}" -- "$bus_url$path" >"$bus_work/http-code" 2>"$bus_work/curl-error" \
    || curl_status=$?
  if [ "$curl_status" -ne 0 ]; then
    local reason
    reason=$(bus_one_line <"$bus_work/curl-error")
    reason=${reason#curl: }
    if [[ $reason =~ ^\([0-9]+\)\ (.*)$ ]]; then reason=${BASH_REMATCH[1]}; fi
    if [ "$curl_status" -eq 60 ]; then
      reason="its TLS certificate is not trusted here; point AGENT_BUS_CA at the CA certificate that signed it ($reason)"
    fi
    bus_error="cannot reach the bus at $bus_url: ${reason:-curl failed}"
    return "$EXIT_UNREACHABLE"
  fi
  local code
  code=$(<"$bus_work/http-code")
  case "$code" in
    2??)
      if [ ! -s "$out" ] || ! jq empty "$out" >/dev/null 2>&1; then
        bus_error="the bus answered $code with a body that is not JSON; is AGENT_BUS_URL pointing at an agent-bus?"
        return "$EXIT_UNREACHABLE"
      fi
      return 0 ;;
  esac
  bus_error="the bus answered $code: $(bus_reply_error "$out")"
  local name value
  while IFS=: read -r name value; do
    case "$name" in
      [Rr][Ee][Tt][Rr][Yy]-[Aa][Ff][Tt][Ee][Rr])
        value=${value//[[:space:]]/}
        case "$value" in ''|*[!0-9]*) ;; *) bus_retry_after=$value ;; esac ;;
    esac
  done <"$bus_work/reply-headers"
  case "$code" in
    429|5??) return "$EXIT_UNREACHABLE" ;;
  esac
  return "$EXIT_REFUSED"
}

bus_reply_error() {  # the error text of a reply: its JSON "error", else its first 200 bytes
  local text
  text=$(jq -r 'if type == "object" and (.error | type) == "string" then .error else empty end' \
         "$1" 2>/dev/null) || text=""
  if [ -z "$text" ]; then text=$(head -c 200 "$1"); fi
  printf '%s' "$text" | bus_one_line
}

bus_one_line() {  # standard input on one line: line breaks and tabs as single spaces
  local text
  text=$(tr -s '\r\n\t' '   ')
  printf '%s' "${text%"${text##*[![:space:]]}"}"
}

bus_call() {  # bus_call PATH OUT [BODY_FILE]: bus_http, or exit with its message and code
  local status=0
  bus_http "$@" || status=$?
  if [ "$status" -ne 0 ]; then die "$status" "$bus_error"; fi
}

# Capped exponential backoff, as busd/client.py Backoff: 0.5 s, 1 s, 2 s ... 10 s,
# or the server's Retry-After when that is longer. Sets bus_delay (seconds).
bus_backoff_ms=0
bus_next_delay() {
  if [ "$bus_backoff_ms" -eq 0 ]; then
    bus_backoff_ms=500
  else
    bus_backoff_ms=$((bus_backoff_ms * 2 > 10000 ? 10000 : bus_backoff_ms * 2))
  fi
  local ms=$bus_backoff_ms
  if [ -n "$bus_retry_after" ] && [ "$((bus_retry_after * 1000))" -gt "$ms" ]; then
    ms=$((bus_retry_after * 1000))
  fi
  # Every delay is a whole number of half seconds; print it as Python's {:g} does.
  bus_delay=$((ms / 1000))
  if [ "$((ms % 1000))" -ne 0 ]; then bus_delay="$bus_delay.5"; fi
}

bus_retry_later() {  # report bus_error, then sleep the next backoff delay
  bus_next_delay
  printf '%s: %s; retrying in %ss\n' "$bus_prog" "$bus_error" "$bus_delay" >&2
  bus_wait_for sleep "$bus_delay"
}

bus_number() {  # bus_number TEXT: TEXT as a py_float, or fail if it is not a finite number
  jq -rn --arg v "$1" "$BUS_JQ"'
    $v | tonumber | if isinfinite or isnan then error("not finite") else py_float end' 2>/dev/null
}

bus_cursor_file() {  # bus_cursor_file NAME CHANNEL: the file `agent-bus recv` keeps
  # '@' and '%' never occur in names, so every (name, channel) has its own file.
  printf '%s/%s@%s.cursor' "$bus_cursor_dir" "$1" "${2//\*/%2A}"
}

bus_load_cursor() {  # bus_load_cursor FILE: its number (0.0 when absent or empty)
  local text=""
  if [ -e "$1" ]; then text=$(<"$1"); fi
  text=${text//[[:space:]]/}
  if [ -z "$text" ]; then
    printf '0.0\n'
    return
  fi
  bus_number "$text" || die "$EXIT_USAGE" "$1: not a cursor (a number of seconds); fix or delete it"
}

bus_save_cursor() {  # bus_save_cursor FILE VALUE: replace FILE atomically (tmp, sync, mv)
  local folder
  folder=$(dirname -- "$1")
  mkdir -p -- "$folder"
  bus_pending_tmp=$(mktemp "$folder/.cursor.XXXXXX")
  printf '%s\n' "$2" >"$bus_pending_tmp"
  sync -- "$bus_pending_tmp" 2>/dev/null || true
  mv -f -- "$bus_pending_tmp" "$1"
  bus_pending_tmp=""
}
