# shellcheck shell=bash disable=SC2034,SC2154  # variables set for, and by, bus_args
# bin/lib/agent-bus.sh: the bus-* commands, in bash with curl (7.55 or newer) and jq (1.6
# or newer). Each bin/bus-X is an entry point that sources this file and runs
# `bus_main X "$@"`, which calls cmd_X: the same environment, output bytes and exit codes
# as `agent-bus X`. GNU coreutils (sha256sum, stat, realpath) hash handoffs; openssl
# (1.1.1 or newer) signs sends. The Python CLI prints what jq writes naturally
# (busd/jqtext.py), so nothing here imitates Python.
set -euo pipefail
umask 077

readonly EXIT_OK=0
readonly EXIT_REFUSED=1        # the bus refused the request (a 4xx other than 429)
readonly EXIT_USAGE=2          # wrong arguments or configuration
readonly EXIT_UNREACHABLE=3    # the bus could not be reached, or failed (network, 5xx, 429)

bus_prog=${0##*/}
bus_lib_dir=${BASH_SOURCE[0]%/*}

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
bus_key=${AGENT_BUS_KEY:-}
bus_state_home=${XDG_STATE_HOME:-$HOME/.local/state}
bus_spool_root=${AGENT_BUS_SPOOL:-$bus_state_home/agent-bus}
bus_cursor_dir=${AGENT_BUS_STATE_DIR:-$bus_state_home/agent-bus/cursors}
bus_listen_dir=${AGENT_BUS_LISTEN_DIR:-$bus_state_home/agent-bus/listen}
case "${AGENT_BUS_NO_CURSOR:-}" in
  ""|0) bus_no_cursor=0 ;;
  *) bus_no_cursor=1 ;;
esac

# jq definitions the commands prepend to their filters: the formats of busd/framing.py
# (monitor_block, and frame_escape, its escape rule, byte for byte), busd/listener.py
# (summary_line), busd/receive.py (next_since, the cursor rule) and busd/cli/ (the
# agents table, the status lines).
#   json_shown   a value on one line as framing.shown_name shows a name that is not one:
#                JSON, with the characters jq leaves raw but a reader may take for a line
#                break (U+0080-U+009F, U+2028, U+2029) escaped too.
#   frame_escape a body segment (the body's start, and after each control character but
#                tab, U+2028 and U+2029) that begins with backslashes, blanks, then ---,
#                [, handoff: or note: gets one backslash more (blanks, dashes and
#                brackets: framing.BLANKS, DASHES and BRACKETS, the same code points). Written without a global
#                regex (jq 1.6 takes quadratic time for those): one pass over the codepoints.
# shellcheck disable=SC2016  # jq's $variables, not the shell's
BUS_JQ='
def hex4: [(. / 4096 | floor) % 16, (. / 256 | floor) % 16, (. / 16 | floor) % 16, . % 16]
  | map("0123456789abcdef"[.:. + 1]) | add;
def json_shown: tojson | [explode[] | if (. >= 128 and . <= 159) or . == 8232 or . == 8233
  then "\\u" + hex4 else [.] | implode end] | add // "";
def one_line($sep): split("\n") | join($sep) | split("\r") | join(" ") | split("\t") | join(" ");
def shown_name: if type == "string" and test("^[A-Za-z0-9._-]{1,64}$") and test("[^.]") then . else json_shown end;
def frame_blank: . == 9 or . == 32 or . == 160 or . == 173 or . == 847 or . == 1564
  or (. >= 4447 and . <= 4448) or . == 5760 or (. >= 6068 and . <= 6069)
  or (. >= 6155 and . <= 6159) or (. >= 8192 and . <= 8207) or (. >= 8234 and . <= 8239)
  or (. >= 8287 and . <= 8303) or . == 10240 or . == 12288 or . == 12644
  or (. >= 65024 and . <= 65039) or . == 65279 or . == 65440 or (. >= 65529 and . <= 65531)
  or (. >= 917504 and . <= 921599);
def frame_dash: . == 45 or (. >= 8208 and . <= 8213) or . == 8722 or . == 9135
  or (. >= 9472 and . <= 9473) or (. >= 11834 and . <= 11835) or . == 12032 or . == 12540
  or . == 19968 or . == 65112 or . == 65123 or . == 65293;
def frame_bracket: . == 91 or . == 8261 or (. >= 9121 and . <= 9123) or . == 10098
  or . == 10214 or . == 12304 or . == 12308 or . == 12310 or . == 12314 or . == 65117
  or . == 65339;
def frame_fold: if . >= 65 and . <= 90 then . + 32 elif frame_dash then 45
  elif frame_bracket then 91 else . end;
def frame_escape:
  explode as $c | ($c | length) as $n
  | if any($c[]; frame_dash or frame_bracket or . == 58) | not then . else
    def brk: . <= 8 or (. >= 10 and . <= 31) or (. >= 127 and . <= 159) or . == 8232 or . == 8233;
    def form:
      (until(. >= $n or $c[.] != 92; . + 1) | until(. >= $n or ($c[.] | frame_blank | not); . + 1)) as $m
      | $c[$m:$m + 8] | map(frame_fold) | implode
      | startswith("---") or startswith("[") or startswith("handoff:") or startswith("note:");
    [0, (range(0; $n) | select($c[.] | brk) | . + 1)] | map(select(form)) as $at
  | ([0] + $at) as $from | ($at + [$n]) as $to
  | [range(0; $from | length) as $i | (if $i > 0 then 92 else empty end), $c[$from[$i]:$to[$i]][]]
  | implode end;
def monitor_block: "[\(.ts | floor | strftime("%H:%M:%S"))Z] from \(.from | shown_name):\n\(.msg // "" | tostring | frame_escape)\n---";
def summary_line: "\(.ts)\t\(.from)\t\(.msg // "" | tostring | one_line(" | ") | .[0:120])";
def next_since($since): [$since, (.now | numbers), (.messages[]?.ts | numbers)] | max;
def status_lines: .messages[] | . as $m
  | if ((.recipients // {}) | length) == 0 then "\(.id)\t\(.state)\t\(.to // "-")"
    else (.recipients | to_entries[] | "\($m.id)\t\(.value)\t\(.key)") end;
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

# -- arguments ---------------------------------------------------------------------

bus_opt_var() {  # --some-option -> opt_some_option
  local name=${1#--}
  printf 'opt_%s' "${name//-/_}"
}

# bus_args SPEC... -- ARG...: parse a command's arguments as argparse would. SPEC words:
# `--opt=` takes a value (opt_opt, unset until given), `--flag` is 0 or 1 (opt_flag),
# NAME is the next positional (arg_NAME, unset until given), NAME... takes the rest
# (the array bus_rest). -h prints the command's usage; anything else is a usage error.
bus_args() {
  local -a positional=() given=()
  local valued=" " flags=" " name var
  while [ "$1" != -- ]; do
    case "$1" in
      --*=) valued+="${1%=} "; unset "$(bus_opt_var "${1%=}")" ;;
      --*) flags+="$1 "; printf -v "$(bus_opt_var "$1")" 0 ;;
      *) positional+=("$1"); unset "arg_$1" ;;
    esac
    shift
  done
  shift
  while [ $# -gt 0 ]; do
    case "$1" in
      -h|--help) "usage_$bus_cmd"; exit "$EXIT_OK" ;;
      --) shift; given+=("$@"); break ;;
      --*=*)
        name=${1%%=*}
        [[ $valued == *" $name "* ]] || bus_usage_error "unknown option: $1"
        printf -v "$(bus_opt_var "$name")" '%s' "${1#*=}" ;;
      -?*)
        var=$(bus_opt_var "$1")
        if [[ $valued == *" $1 "* ]]; then
          [ $# -ge 2 ] || bus_usage_error "$1 needs a value"
          printf -v "$var" '%s' "$2"
          shift
        elif [[ $flags == *" $1 "* ]]; then
          printf -v "$var" 1
        else
          bus_usage_error "unknown option: $1"
        fi ;;
      *) given+=("$1") ;;
    esac
    shift
  done
  bus_rest=()
  for name in "${positional[@]}"; do
    if [[ $name == *... ]]; then
      bus_rest=("${given[@]}")
      given=()
    elif [ "${#given[@]}" -gt 0 ]; then
      printf -v "arg_$name" '%s' "${given[0]}"
      given=("${given[@]:1}")
    fi
  done
  [ "${#given[@]}" -eq 0 ] || bus_usage_error "unexpected argument: ${given[0]}"
}

bus_given() {  # bus_given VAR: whether the option or argument VAR was given
  [ -n "${!1+x}" ]
}

# -- the run of one command --------------------------------------------------------

bus_work=""
bus_term_status=143    # the followers set 0: for them SIGTERM is the way to stop, as in Python
bus_child_pid=""
bus_pending_tmp=""

bus_cleanup() {
  if [ -n "$bus_child_pid" ]; then kill "$bus_child_pid" 2>/dev/null || true; fi
  if [ -n "$bus_pending_tmp" ]; then rm -f -- "$bus_pending_tmp"; fi
  if [ -n "$bus_work" ]; then rm -rf -- "$bus_work"; fi
}

# bus_start [TOOL...]: check jq and the tools (default curl), make the private work
# folder, clean up on any exit.
bus_start() {
  local tool
  local -a tools=(curl)
  if [ $# -gt 0 ]; then tools=("$@"); fi
  for tool in "${tools[@]}" jq; do
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

bus_require_agent_folder() {  # bus_require_name, then the name must make a spool folder
  bus_require_name "$@"
  bus_valid_name "$bus_agent" \
    || die "$EXIT_USAGE" "invalid agent name '$bus_agent': use 1-64 characters of A-Z a-z 0-9 . _ - (not only dots)"
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

bus_absolute() {  # bus_absolute PATH: PATH made absolute, no link resolved (busd/handoff.py absolute)
  local path
  path=$(realpath -m -s -- "$1" && printf x)
  printf '%s' "${path%$'\nx'}"
}

bus_uri() {  # bus_uri VALUE: VALUE encoded for a URL query
  jq -rn --arg v "$1" '$v | @uri'
}

bus_utf8() {  # bus_utf8 FILE: whether FILE holds UTF-8 text that jq carries unchanged
  # (jq turns bytes that are not UTF-8 into U+FFFD without a word: a changed round trip tells)
  [ "$(jq -Rsj . <"$1" | cksum)" = "$(cksum <"$1")" ]
}

# bus_write_atomically FILE [TEMP_DIR]: standard input becomes FILE all at once: written
# under a hidden temporary name (in TEMP_DIR, default FILE's folder), synced, renamed.
bus_write_atomically() {
  local folder=${2:-$(dirname -- "$1")}
  bus_pending_tmp=$(mktemp "$folder/.${1##*/}.XXXXXXXX.tmp")
  cat >"$bus_pending_tmp"
  sync -- "$bus_pending_tmp" 2>/dev/null || true
  mv -f -- "$bus_pending_tmp" "$1"
  bus_pending_tmp=""
}

# -- HTTP ------------------------------------------------------------------------------

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

bus_fetch() {  # bus_fetch PATH: GET PATH into $bus_work/reply, or exit with the bus's message
  bus_start
  bus_require_url
  bus_call "$1" "$bus_work/reply"
}

# -- sending: the secret guard, signing, the /send request (busd/mailbox.py send) -------

# The secret guard of busd/secretguard.py: find_secret($shapes; $set) is the name of the
# first secret-looking thing in the input string, or null. $shapes is
# busd/data/secret-shapes.json, the file Python reads; this gives its patterns jq's
# regex engine (Oniguruma) the meaning Python's re gives them:
#   ws         Python's \s: exactly the characters str.isspace() accepts
#   <wb>, <we> no word character ([\p{L}\p{N}_]) before, after
#   labelled   "a digest label, then at most 4 separators, right before": one fixed-length
#              look-behind per label and separator count (Oniguruma allows only those),
#              each letter as [Xx]; a label may be followed by one more newline, as
#              Python's $ allows.
# Oniguruma's (?i) also folds "ß" to "ss", and the labels match ASCII case only (Python
# reads "ſ" as an s): both can only make the shell refuse a little more, never less.
# shellcheck disable=SC2016  # jq's $variables, not the shell's
BUS_GUARD_JQ='
def ws: "\t\n\u000b\f\r\u001c-\u001f \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";
def meanings($shapes): $shapes.macros + {"<ws>": ws, "<wb>": "(?<![\\p{L}\\p{N}_])", "<we>": "(?![\\p{L}\\p{N}_])"};
def expand($meanings): reduce ($meanings | to_entries[]) as $m (.; split($m.key) | join($m.value));
def labelled($shapes):
  ($shapes.label_separators | expand(meanings($shapes))) as $sep
  | $shapes.digest_labels
  | map(explode | map(if 97 <= . and . <= 122 then "[\([. - 32, .] | implode)]" else [.] | implode end) | add)
  | map(. as $word | (range(0; 5) | "\($word)[\($sep)]{\(.)}"), "\($word)[\($sep)]{4}\n")
  | map("(?<!\(.))") | add;
def hex64($shapes): "(?<![0-9A-Fa-f])(?=(?:0x)?[0-9A-Fa-f]{64}(?![0-9A-Fa-f]))\(labelled($shapes))"
  + "(?:0x|(?<!(?<![0-9A-Fa-f])0x))[0-9A-Fa-f]{64}(?![0-9A-Fa-f])";
def bip39_set: split("\n") | map(select(. != "") | {key: ., value: true}) | from_entries;
def seed_phrase($set; $enough):
  sub("\\A[\(ws)]+"; "") | sub("[\(ws)]+\\z"; "")
  # Plain splits: a regex split in jq 1.6 takes time quadratic in the length.
  | split("\t") | join(" ") | split("\r") | join(" ") | split("\n") | join(" ")
  | reduce (split(" ")[] | select(. != "")) as $token (0;
      if . >= $enough then .
      else ($token | until(startswith(".") or startswith(",") or startswith(";") | not; .[1:])
          | until(endswith(".") or endswith(",") or endswith(";") | not; .[:-1])) as $word
        | if $set[$word] == true then . + 1 else 0 end
      end)
  | . >= $enough;
def find_secret($shapes; $set):  # $set: the BIP-39 word list made into an object by bip39_set
  . as $text | meanings($shapes) as $meanings
  | first($shapes.shapes[] | select(.[1] | expand($meanings) as $re | $text | test($re)) | .[0])
    // if test(hex64($shapes)) then "an unlabelled 64-hex-digit key"
       elif seed_phrase($set; $shapes.seed_phrase_words)
       then "a seed phrase (\($shapes.seed_phrase_words) or more BIP-39 words in a row)"
       else null end;
'

# bus_guard_data NAME: bus_data, the path of a data file of busd/data/: beside this
# library once installed (install.sh copies them there), in busd/data/ of a checkout.
bus_guard_data() {
  bus_data=$bus_lib_dir/$1
  [ -r "$bus_data" ] || bus_data=$bus_lib_dir/../../busd/data/$1
  [ -r "$bus_data" ] \
    || die "$EXIT_USAGE" "the secret guard's data is missing: copy busd/data/$1 of agent-bus into $bus_lib_dir/ (./install.sh does)"
}

# bus_secret_refusal FILE: why the text in FILE must not be sent, in the words of
# busd/secretguard.py refusal() (pointing at bus-handoff), or nothing when it looks clean.
bus_secret_refusal() {
  local shapes
  bus_guard_data secret-shapes.json
  shapes=$bus_data
  bus_guard_data bip39-english.txt
  jq -Rrs --slurpfile shapes "$shapes" --rawfile words "$bus_data" "$BUS_GUARD_JQ"'
    find_secret($shapes[0]; $words | bip39_set) // empty
    | "the message looks like it holds \(.); send it as a file instead: bus-handoff --to NAME FILE (only its sha256 and path travel); --allow-secret sends this one message anyway"' "$1"
}

bus_check_key() {  # AGENT_BUS_KEY, when set, must be an unencrypted Ed25519 PEM private key
  [ -n "$bus_key" ] || return 0
  local tool
  for tool in openssl sha256sum; do
    command -v "$tool" >/dev/null 2>&1 \
      || die "$EXIT_USAGE" "AGENT_BUS_KEY is set, and signing needs $tool, which is not installed (Debian/Ubuntu: apt-get install ${tool/sha256sum/coreutils})"
  done
  local reason
  if [ -d "$bus_key" ]; then reason="Is a directory"
  elif ! reason=$( { : <"$bus_key"; } 2>&1 ); then reason=${reason##*: }
  else reason=""
  fi
  [ -z "$reason" ] || die "$EXIT_USAGE" "AGENT_BUS_KEY: cannot read the private key $bus_key: $reason"
  # -passin pass: makes an encrypted key fail instead of asking for its passphrase.
  reason=$(openssl pkey -inform PEM -in "$bus_key" -passin pass: -noout -text_pub 2>/dev/null) \
    || die "$EXIT_USAGE" "AGENT_BUS_KEY: $bus_key is not an unencrypted PEM private key"
  case "$reason" in
    "ED25519 Public-Key:"*) ;;
    *) die "$EXIT_USAGE" "AGENT_BUS_KEY: $bus_key is not an Ed25519 key" ;;
  esac
}
# The canonical meta of busd/signing.py canonical_meta, as jq definitions: one line per
# key in the order of the keys' UTF-8 bytes (jq's `keys`), "base64(key) value", where
# value is s+base64 (a string), n+number, t, f or z (null). jq writes a number as the
# shortest decimal that reads back as the same double, as Python's repr does; only the
# layout differs ("1e-05", "1.5e+16", "-0"), so both bring it to DIGITSeEXPONENT.
# shellcheck disable=SC2016  # jq's $variables, not the shell's
BUS_SIGN_JQ='
def canonical_number:
  tostring
  | (if startswith("-") then "-" else "" end) as $sign
  | ltrimstr("-") | ascii_downcase | split("e") as [$mantissa, $exponent]
  | ($mantissa | split(".")) as [$whole, $fraction]
  | ($fraction // "") as $fraction
  | ($whole + $fraction | sub("^0+"; "")) as $digits
  | ($digits | sub("0+$"; "")) as $significant
  | if $significant == "" then "0"
    else "\($sign)\($significant)e\(($exponent // "0" | tonumber) - ($fraction | length)
                                    + ($digits | length) - ($significant | length))"
    end;
def canonical_meta:
  . as $meta
  | [keys[] | "\(@base64) \($meta[.] | if type == "string" then "s" + @base64
                                       elif type == "number" then "n" + canonical_number
                                       elif . == true then "t" elif . == false then "f"
                                       elif . == null then "z"
                                       else error("meta must be a flat JSON object") end)\n"]
  | add // "";
'

# bus_native_payload REQUEST OUT: write to OUT the bytes a native signature covers, as
# busd/signing.py native_payload builds them from the signed /send request in REQUEST:
# the tag, channel, from, to, signed_at, key, the sha256 of msg and the sha256 of meta's
# canonical form ("-" without meta), one per line.
bus_native_payload() {
  local request=$1 out=$2 body_digest meta_digest=-
  body_digest=$(jq -j .msg "$request" | sha256sum)
  if ! jq -e '.meta == null' "$request" >/dev/null; then
    jq -j "$BUS_SIGN_JQ"'.meta | canonical_meta' "$request" >"$out.meta" \
      || die "$EXIT_USAGE" "meta cannot be signed: it must be a flat JSON object"
    meta_digest=$(sha256sum <"$out.meta")
    meta_digest=${meta_digest%% *}
    rm -f -- "$out.meta"
  fi
  jq -j --arg body "${body_digest%% *}" --arg meta "$meta_digest" '
    ["agent-bus:send:v2", .channel, .from, .to, (.signed_at | tostring), .key, $body, $meta]
    | join("\n")' "$request" >"$out"
}

# bus_sign_request REQUEST: sign the /send request in REQUEST with AGENT_BUS_KEY as
# busd/client.py does: signed_at (ms), the idempotency key (a new random one when none
# is given: it is the nonce that makes a replay detectable), and an Ed25519 signature of
# bus_native_payload, base64 on one line.
bus_sign_request() {
  local request=$1 key=""
  if jq -e '(.key // "") == ""' "$request" >/dev/null; then
    key=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
  fi
  jq --arg key "$key" --argjson signed_at "$(date +%s%3N)" '
    (if $key == "" then . else .key = $key end) | .signed_at = $signed_at' \
    "$request" >"$bus_work/signed"
  bus_native_payload "$bus_work/signed" "$bus_work/payload"
  openssl pkeyutl -sign -rawin -inkey "$bus_key" -passin pass: -in "$bus_work/payload" \
      -out "$bus_work/signature" 2>"$bus_work/openssl-error" \
    || die "$EXIT_USAGE" "AGENT_BUS_KEY: signing with $bus_key failed: $(bus_one_line <"$bus_work/openssl-error")"
  jq --arg signature "$(openssl base64 -A -in "$bus_work/signature")" '.signature = $signature' \
    "$bus_work/signed" >"$request"
}

# bus_post_send REQUEST: POST the /send request in REQUEST (signed first when
# AGENT_BUS_KEY is set) and print the acknowledgement as `agent-bus send` prints it, or
# exit with the bus's message and code (one line of JSON, as `jq -c .` writes it). A 409 with code 40902 says our own earlier
# signed send with this key was stored: that is success, as in busd/client.py.
bus_post_send() {
  local request=$1 status=0 ack=$bus_work/reply
  if [ -n "$bus_key" ]; then bus_sign_request "$request"; fi
  bus_http /send "$bus_work/reply" "$request" || status=$?
  if [ "$status" -eq "$EXIT_REFUSED" ] \
      && jq -e 'type == "object" and .code == 40902' "$bus_work/reply" >/dev/null 2>&1; then
    ack=$bus_work/ack
    jq --slurpfile request "$request" \
      '{ok: true, ts: .ts, channel: $request[0].channel, id: .id, duplicate: true}' \
      "$bus_work/reply" >"$ack"
  elif [ "$status" -ne 0 ]; then
    die "$status" "$bus_error"
  fi
  jq -c . "$ack"
}


# -- receiving: the cursor and the follow loop (busd/receive.py) ------------------------

bus_number() {  # bus_number TEXT: TEXT as jq writes the number, or fail if it is not a finite number
  jq -rn --arg v "$1" '$v | tonumber | if isinfinite or isnan then error("not finite") else . end' 2>/dev/null
}

bus_load_cursor() {  # bus_load_cursor FILE: its number (0 when absent or empty)
  local text=""
  if [ -e "$1" ]; then text=$(<"$1"); fi
  text=${text//[[:space:]]/}
  bus_number "${text:-0}" || die "$EXIT_USAGE" "$1: not a cursor (a number of seconds); fix or delete it"
}

# Capped exponential backoff, as busd/receive.py Backoff: 0.5 s, 1 s, 2 s ... 10 s, or
# the server's Retry-After when that is longer; reported in milliseconds, as Python does.
bus_backoff_ms=0
bus_retry_later() {  # report bus_error, then sleep the next backoff delay
  if [ "$bus_backoff_ms" -eq 0 ]; then
    bus_backoff_ms=500
  else
    bus_backoff_ms=$((bus_backoff_ms * 2 > 10000 ? 10000 : bus_backoff_ms * 2))
  fi
  local ms=$bus_backoff_ms
  if [ -n "$bus_retry_after" ] && [ "$((bus_retry_after * 1000))" -gt "$ms" ]; then
    ms=$((bus_retry_after * 1000))
  fi
  printf '%s: %s; retrying in %s ms\n' "$bus_prog" "$bus_error" "$ms" >&2
  bus_wait_for sleep "$((ms / 1000)).$((ms % 1000 / 100))"
}

# bus_follow NAME CHANNEL ONCE HANDLER [CURSOR_FILE]: long-poll NAME's messages on
# CHANNEL from $since; HANDLER REPLY handles each reply's messages past $since, then
# $since advances by the cursor rule (next_since) and is saved in CURSOR_FILE. A
# refusal, or with ONCE=1 any error, exits; other errors are retried with backoff.
bus_follow() {
  local query once=$3 handler=$4 cursor=${5:-} reply=$bus_work/reply status next
  query="/recv?to=$(bus_uri "$1")&channel=$(bus_uri "$2")&block=true"
  if [ -n "$cursor" ]; then mkdir -p -- "$(dirname -- "$cursor")"; fi
  while :; do
    status=0
    bus_http "$query&since=$since" "$reply" "" 35 || status=$?
    if [ "$status" = "$EXIT_REFUSED" ] || { [ "$status" != 0 ] && [ "$once" = 1 ]; }; then
      die "$status" "$bus_error"
    fi
    if [ "$status" != 0 ]; then
      bus_retry_later
      continue
    fi
    bus_backoff_ms=0
    "$handler" "$reply"
    next=$(jq -r --argjson since "$since" "$BUS_JQ next_since(\$since)" "$reply")
    if [ "$next" != "$since" ]; then
      since=$next
      if [ -n "$cursor" ]; then bus_write_atomically "$cursor" <<<"$since"; fi
    fi
    if [ "$once" = 1 ]; then return; fi
  done
}

bus_fresh() {  # bus_fresh REPLY FILTER: FILTER over the reply's messages past $since
  jq -r --argjson since "$since" "$BUS_JQ .messages[]? | select(.ts > \$since) | $2" "$1"
}

# -- the commands ------------------------------------------------------------------------

cmd_send() {
  bus_args --channel= --from= --key= --meta= --allow-secret to -- "$@"
  bus_given arg_to || bus_usage_error "TO is required: the recipient name, or '*' for everyone on the channel"
  # The order of `agent-bus send`: the arguments, the body, the guard, then the bus.
  bus_start
  if bus_given opt_meta && ! jq -n --argjson meta "$opt_meta" '$meta' >/dev/null 2>&1; then
    die "$EXIT_USAGE" "--meta is not JSON: $opt_meta"
  fi
  bus_require_name "${opt_from-}" "--from NAME"
  cat >"$bus_work/stdin"
  bus_utf8 "$bus_work/stdin" \
    || die "$EXIT_USAGE" "standard input is not UTF-8 text; send binary data as a handoff instead"
  local -a jq_args=(--arg from "$bus_agent" --arg to "$arg_to" --arg channel "${opt_channel:-$bus_channel}")
  local filter='{from: $from, to: $to, msg: ., channel: $channel}'
  if bus_given opt_key; then jq_args+=(--arg key "$opt_key"); filter+=' + {key: $key}'; fi
  if bus_given opt_meta; then jq_args+=(--argjson meta "$opt_meta"); filter+=' + {meta: $meta}'; fi
  jq -Rs "${jq_args[@]}" "$filter" <"$bus_work/stdin" >"$bus_work/request"
  if [ "$opt_allow_secret" = 0 ]; then
    local problem
    problem=$(bus_secret_refusal "$bus_work/stdin")
    [ -z "$problem" ] || die "$EXIT_REFUSED" "not sent: $problem"
  fi
  bus_require_url
  bus_check_key
  bus_post_send "$bus_work/request"
}

# bus_follower_start: what recv and listen do first; sets follow_channel and follow_stem
# (NAME@CHANNEL: '@' and '%' never occur in names, so every pair has its own files).
bus_follower_start() {
  bus_term_status=$EXIT_OK
  bus_start
  if bus_given opt_since; then
    since=$(bus_number "$opt_since") || bus_usage_error "--since must be a number of seconds, got '$opt_since'"
  fi
  bus_require_name "${arg_name-}"
  follow_channel=${opt_channel:-$bus_channel}
  bus_require_url
  follow_stem=$bus_agent@${follow_channel//\*/%2A}
}

cmd_recv() {
  bus_args --channel= --since= --once --no-cursor name -- "$@"
  bus_follower_start
  local cursor=""
  if [ "$opt_no_cursor" = 0 ] && [ "$bus_no_cursor" = 0 ]; then
    cursor=$bus_cursor_dir/$follow_stem.cursor
  fi
  if bus_given opt_since; then
    :
  elif [ -n "$cursor" ]; then
    since=$(bus_load_cursor "$cursor")
  else
    bus_call /healthz "$bus_work/health"
    since=$(jq -r .now "$bus_work/health")
  fi
  bus_follow "$bus_agent" "$follow_channel" "$opt_once" bus_print_blocks "$cursor"
}

bus_print_blocks() {
  bus_fresh "$1" monitor_block
}

cmd_listen() {
  bus_args --channel= --dir= --full= --summary= --heartbeat= --since= --once name -- "$@"
  bus_follower_start
  local stem file last
  stem=${opt_dir:-$bus_listen_dir}/$follow_stem
  listen_full=${opt_full:-$stem.jsonl}
  listen_summary=${opt_summary:-$stem.tsv}
  listen_heartbeat=${opt_heartbeat:-$stem.heartbeat}
  for file in "$listen_full" "$listen_summary" "$listen_heartbeat" "$stem.cursor"; do
    mkdir -p -- "$(dirname -- "$file")"
  done
  # A crash mid-append can leave a partial last line; end it so the next line is whole.
  for file in "$listen_full" "$listen_summary"; do
    if [ -s "$file" ] && [ -n "$(tail -c 1 -- "$file")" ]; then printf '\n' >>"$file"; fi
  done
  if ! bus_given opt_since; then
    # Resume at the saved cursor, or at the last logged message if that is later: a
    # crash between logging a batch and saving the cursor then logs nothing twice.
    since=$(bus_load_cursor "$stem.cursor")
    last=$(tail -n 1 -- "$listen_full" 2>/dev/null \
           | jq 'select(type == "object" and (.ts | type) == "number") | .ts' 2>/dev/null) || last=""
    if [ -n "$last" ]; then since=$(jq -n "[$since, $last] | max"); fi
  fi
  bus_follow "$bus_agent" "$follow_channel" "$opt_once" bus_log_batch "$stem.cursor"
}

bus_log_batch() {  # the full log, the summary log, the heartbeat (busd/listener.py)
  bus_fresh "$1" 'tojson' >>"$listen_full"
  bus_fresh "$1" summary_line >>"$listen_summary"
  touch -- "$listen_heartbeat"
}

cmd_drop() {
  bus_args --channel= --from= to -- "$@"
  bus_given arg_to || bus_usage_error "TO is required: the recipient name, or '*' for everyone on the channel"
  bus_start jq
  bus_require_agent_folder "${opt_from-}" "--from NAME"
  local to=$arg_to channel=${opt_channel-} shown
  # The daemon reads `to:` and `channel:` with surrounding blanks trimmed.
  shown=$(bus_header_value "$to") && { [ "$shown" = "*" ] || bus_valid_name "$shown"; } \
    || die "$EXIT_USAGE" "not dropped: invalid recipient name '$to': names are 1-64 characters of A-Z a-z 0-9 . _ - and not only dots; '*' means everyone"
  if [ -n "$channel" ]; then
    shown=$(bus_header_value "$channel") && bus_valid_name "$shown" \
      || die "$EXIT_USAGE" "not dropped: invalid channel '$channel': channels are 1-64 characters of A-Z a-z 0-9 . _ - and not only dots"
  fi
  cat >"$bus_work/body"
  jq -Rse 'explode | index(0) == null' <"$bus_work/body" >/dev/null \
    || die "$EXIT_USAGE" "not dropped: binary: standard input holds a NUL byte; only UTF-8 text can be sent: share binary files by their path instead"
  bus_utf8 "$bus_work/body" \
    || die "$EXIT_USAGE" "not dropped: binary: standard input is not UTF-8 text; only UTF-8 text can be sent: share binary files by their path instead"

  mkdir -p -- "$bus_spool_root"
  local folder sub now seconds micros stamp random token target
  folder=$(CDPATH='' cd -- "$bus_spool_root" && pwd)/$bus_agent
  for sub in "" /outbox /claimed /sent /failed /inbox; do
    mkdir -p -- "$folder$sub"
    chmod 700 -- "$folder$sub"
  done
  # The name the daemon expects: UTC time to the microsecond, then 8 random hex digits.
  now=${EPOCHREALTIME:-}
  now=${now/,/.}   # the decimal mark follows the locale
  case "$now" in
    *.*) seconds=${now%.*} micros=${now#*.} ;;
    *) seconds=$(date +%s) micros=000000 ;;
  esac
  TZ=UTC0 printf -v stamp '%(%Y%m%dT%H%M%S)T' "$seconds"
  random=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
  token=$stamp.${micros}Z-$random
  target=$folder/outbox/drop-$token
  # Written beside outbox/, then renamed in: the daemon only ever sees a finished file.
  {
    printf -- '---bus\nto: %s\n' "$to"
    if [ -n "$channel" ]; then printf 'channel: %s\n' "$channel"; fi
    printf -- '---\n'
    cat -- "$bus_work/body"
  } | bus_write_atomically "$target" "$folder"
  sync -- "$folder/outbox" 2>/dev/null || true
  printf '%s\n' "$target"
}

# bus_inbox_entries FILE: NAME's inbox files, oldest first, as "ts TAB id TAB from TAB
# path" lines in FILE. Inbox files are named <ts with 6 decimals>-<id>-<from>.msg
# (busd/agent/inbox.py).
bus_inbox_entries() {
  local inbox=$bus_spool_root/$bus_agent/inbox path file
  : >"$1"
  if [ -d "$inbox" ]; then
    for path in "$inbox"/*.msg; do
      [ -f "$path" ] || continue
      file=${path##*/}
      case "$file" in *[[:cntrl:]]*) continue ;; esac
      if [[ $file =~ ^([0-9]+\.[0-9]{6})-([0-9]+)-(.+)\.msg$ ]]; then
        printf '%s\t%s\t%s\t%s\n' "${BASH_REMATCH[1]}" "$((10#${BASH_REMATCH[2]}))" \
          "${BASH_REMATCH[3]}" "$path" >>"$1"
      fi
    done
  fi
  LC_ALL=C sort -t $'\t' -k1,1n -k2,2n -o "$1" "$1"
}

bus_find_message() {  # bus_find_message ID CODE: the inbox file of message ID, or exit CODE
  local id path
  bus_inbox_entries "$bus_work/entries"
  while IFS=$'\t' read -r _ id _ path; do
    if [ "$id" = "$1" ]; then printf '%s' "$path"; return; fi
  done <"$bus_work/entries"
  die "$2" "no message $1 in $(bus_absolute "$bus_spool_root")/$bus_agent/inbox"
}

# bus_report_read ID: tell the bus message ID was read (POST /read), with the ids an
# earlier read could not tell it (kept in <agent>/read-unreported, as busd/mailbox.py
# keeps them). Unreachable: ID joins them, a note goes to stderr, and the exit stays 0.
bus_report_read() {
  local folder=$bus_spool_root/$bus_agent kept=$bus_spool_root/$bus_agent/read-unreported status=0
  jq -n --arg agent "$bus_agent" --argjson id "$1" --slurpfile kept <(
      jq -c '[.[]? | select(type == "number" and . >= 1 and . == floor)]' "$kept" 2>/dev/null || true) \
    '{agent: $agent, ids: ((($kept[0] // []) + [$id]) | unique | .[-1000:])}' >"$bus_work/read"
  if [ -z "$bus_url" ]; then
    bus_error="AGENT_BUS_URL is not set"
    status=$EXIT_USAGE
  else
    bus_http /read "$bus_work/read-reply" "$bus_work/read" || status=$?
  fi
  if [ "$status" -eq 0 ] || [ "$status" -eq "$EXIT_REFUSED" ]; then
    rm -f -- "$kept"   # told, or refused for good (not its message, a revoked token)
  else
    jq -c .ids "$bus_work/read" | bus_write_atomically "$kept" "$folder"
  fi
  if [ "$status" -ne 0 ]; then
    printf 'bus-inbox: message %s is not reported read yet: %s\n' "$1" "$bus_error" >&2
  fi
}

cmd_inbox() {
  bus_args --read= --body name -- "$@"
  local read_id=${opt_read-}
  if bus_given opt_read; then
    [[ $read_id =~ ^[0-9]{1,18}$ ]] || bus_usage_error "--read takes a message id (a whole number), got '$read_id'"
    read_id=$((10#$read_id))
  elif [ "$opt_body" = 1 ]; then
    bus_usage_error "--body goes with --read ID"
  fi
  bus_start jq
  bus_require_agent_folder "${arg_name-}"
  if [ -n "$read_id" ]; then
    local found line offset=0 blank=0
    found=$(bus_find_message "$read_id" "$EXIT_REFUSED")
    if [ "$opt_body" = 0 ]; then
      cat -- "$found"
      bus_report_read "$read_id"
      return
    fi
    # The body starts after the first empty line; count the header's bytes, not characters.
    local LC_ALL=C
    while IFS= read -r line; do
      offset=$((offset + ${#line} + 1))
      if [ -z "$line" ]; then blank=1; break; fi
    done <"$found"
    [ "$blank" = 1 ] || die "$EXIT_REFUSED" "$found: not an inbox file: no blank line after the headers"
    tail -c "+$((offset + 1))" -- "$found"
    bus_report_read "$read_id"
    return
  fi
  bus_inbox_entries "$bus_work/entries"
  # One jq for many files; batches keep the command line short in a full inbox.
  # shellcheck disable=SC2016  # jq's $ARGS
  local list='$ARGS.positional as $p | range(0; $p | length; 3) as $i
    | ($ARGS.named["f\($i / 3)"] | split("\n\n") | .[1:] | join("\n\n")
       | split("\n") | join(" | ") | .[0:120]
       | explode | map(if . < 32 or (. >= 127 and . < 160) or . == 8232 or . == 8233 then 32 else . end)
       | implode) as $preview
    | "\($p[$i + 1])\t\($p[$i] | tonumber | floor | strftime("%Y-%m-%dT%H:%M:%SZ"))\t\($p[$i + 2])\t\($preview)"'
  local -a batch=() files=()
  local ts id sender path
  while IFS=$'\t' read -r ts id sender path; do
    files+=(--rawfile "f$((${#batch[@]} / 3))" "$path")
    batch+=("$ts" "$id" "$sender")
    if [ "${#batch[@]}" -ge 1500 ]; then
      jq -rn "${files[@]}" "$list" --args "${batch[@]}"
      batch=() files=()
    fi
  done <"$bus_work/entries"
  if [ "${#batch[@]}" -gt 0 ]; then jq -rn "${files[@]}" "$list" --args "${batch[@]}"; fi
}

cmd_handoff() {
  bus_args --to= --note= --channel= --from= FILE... -- "$@"
  bus_given opt_to || bus_usage_error "--to NAME is required: the recipient name, or '*'"
  [ "${#bus_rest[@]}" -gt 0 ] || bus_usage_error "FILE is required: the file(s) to hand off"
  bus_start curl sha256sum
  bus_require_name "${opt_from-}" "--from NAME"
  # Each file, as busd/handoff.py describe() does it: made private, then read once for
  # its sha256, size, lines and last byte; its mtime as Python's st_mtime (a float).
  local host path absolute reason counts newlines size sha256 last lines mtime seconds exact nanoseconds
  local -a facts=()
  host=$(uname -n)    # what socket.gethostname() returns
  printf '%s' "$host" >"$bus_work/text"
  bus_utf8 "$bus_work/text" || die "$EXIT_USAGE" "the host name is not UTF-8 text: $host"
  for path in "${bus_rest[@]}"; do
    absolute=$(bus_absolute "$path")
    [ -f "$absolute" ] || die "$EXIT_USAGE" "$path: not a regular file"
    printf '%s' "$absolute" >"$bus_work/text"
    bus_utf8 "$bus_work/text" || die "$EXIT_USAGE" "$path: its path is not UTF-8 text; rename it to hand it off"
    reason=$(chmod 600 -- "$absolute" 2>&1) || die "$EXIT_USAGE" "$path: $(bus_os_error "$reason")"
    reason=$( { : <"$absolute"; } 2>&1 ) || die "$EXIT_USAGE" "$path: $(bus_os_error "$reason")"
    # $(...) returns once every process holding its output has ended; the hash and the
    # last byte hold it as fd 3, so their files are complete when it returns.
    counts=$( { tee -- >(sha256sum >"$bus_work/sha256") >(tail -c 1 | od -An -tx1 >"$bus_work/last") \
                <"$absolute" | wc -lc; } 3>&1 2>"$bus_work/error" ) \
      || die "$EXIT_USAGE" "$path: $(bus_os_error "$(<"$bus_work/error")")"
    read -r newlines size <<<"$counts"
    sha256=$(<"$bus_work/sha256")
    sha256=${sha256%% *}
    [[ $sha256 =~ ^[0-9a-f]{64}$ ]] || die "$EXIT_USAGE" "$path: could not be hashed"
    last=$(<"$bus_work/last")
    lines=$newlines
    if [ "$size" -gt 0 ] && [ "${last// /}" != 0a ]; then lines=$((newlines + 1)); fi
    # st_mtime is tv_sec + tv_nsec * 1e-9 in doubles; %Y is tv_sec, %.9Y the exact time.
    mtime=$(stat -L -c '%Y %.9Y' -- "$absolute" 2>&1) || die "$EXIT_USAGE" "$path: $(bus_os_error "$mtime")"
    read -r seconds exact <<<"$mtime"
    nanoseconds=$((10#${exact#*.}))
    if [[ $exact == -* ]] && [ "$nanoseconds" -ne 0 ]; then nanoseconds=$((1000000000 - nanoseconds)); fi
    facts+=("$sha256" "$absolute" "$host" "$size" "$lines" "$seconds" "$nanoseconds")
  done
  if [ -n "${opt_note-}" ]; then
    printf '%s' "$opt_note" >"$bus_work/note"
    bus_utf8 "$bus_work/note" || die "$EXIT_USAGE" "--note is not UTF-8 text"
    local problem
    problem=$(bus_secret_refusal "$bus_work/note")
    [ -z "$problem" ] || die "$EXIT_REFUSED" "--note: $problem"
  fi
  bus_require_url
  bus_check_key
  # The message of busd/handoff.py message_for: meta kind, files, then each file's fields
  # (the first file's plain, the i-th's ending in .i); one line per file, then the note.
  # shellcheck disable=SC2016  # jq's $variables
  jq -n --arg from "$bus_agent" --arg to "$opt_to" --arg channel "${opt_channel:-$bus_channel}" \
    --arg note "${opt_note-}" '
    [$ARGS.positional | range(0; length; 7) as $i | .[$i:$i + 7]
     | {sha256: .[0], path: .[1], host: .[2], bytes: (.[3] | tonumber), lines: (.[4] | tonumber),
        mtime: ((.[5] | tonumber) + (.[6] | tonumber) * 1e-9)}] as $files
    | {from: $from, to: $to, channel: $channel,
       msg: (([$files[] | "\(.path | split("/") | last): lines=\(.lines) sha256=\(.sha256) at \(.host):\(.path)"]
              | join("\n")) + (if $note == "" then "" else "\n" + $note end)),
       meta: ({kind: "handoff", files: ($files | length)}
              + ([$files | to_entries[] | (if .key == 0 then "" else ".\(.key + 1)" end) as $suffix
                  | .value | to_entries[] | {key: (.key + $suffix), value: .value}] | from_entries))}' \
    --args "${facts[@]}" >"$bus_work/request"
  bus_post_send "$bus_work/request"
}

bus_os_error() {  # bus_os_error TEXT: the strerror at the end of a tool's error message
  local text
  text=$(bus_one_line <<<"$1")
  printf '%s' "${text##*: }"
}

cmd_verify() {
  bus_args --name= target sha256 -- "$@"
  bus_given arg_target || bus_usage_error "give an inbox message id, or a FILE and its SHA256"
  bus_start sha256sum dd stat
  # Each file to check, as "expected sha256 NUL path NUL size NUL" in $bus_work/files
  # (the size the handoff announced; empty for a FILE and SHA256).
  if bus_given arg_sha256; then
    printf '%s\0%s\0\0' "$arg_sha256" "$arg_target" >"$bus_work/files"
  elif [[ $arg_target =~ ^[0-9]+$ ]]; then
    local message_id found
    message_id=${arg_target#"${arg_target%%[!0]*}"}
    message_id=${message_id:-0}
    bus_require_agent_folder "${opt_name-}" "--name NAME"
    found=$(bus_find_message "$message_id" "$EXIT_USAGE")
    # The headers (spool/README.md): meta.<field> lines, a plain string as it is and
    # anything else as JSON, and one `meta: {...}` line for other field names; then the
    # files of the handoff as busd/handoff.py files_in() reads them from that meta (a
    # count and sizes are JSON whole numbers: their header text is checked as written).
    # shellcheck disable=SC2016  # jq's $variables
    jq -Rsj --arg id "$message_id" --arg file "$found" '
      def whole: type == "string" and test("^(0|[1-9][0-9]*)$");
      def bad($what): error("message \($id): meta.\($what)");
      if index("\n\n") == null then error("\($file): not an inbox file: no blank line after the headers")
      else . end
      | split("\n\n")[0] | split("\n")
      | reduce (.[] | split(": ") | {name: .[0], value: (.[1:] | join(": "))}) as $h ({meta: {}, raw: {}};
          if $h.name | startswith("meta.") then
            .meta[$h.name[5:]] = ($h.value | try fromjson catch $h.value) | .raw[$h.name[5:]] = $h.value
          elif $h.name == "meta" then
            .meta += ($h.value | (try fromjson catch null) | if type == "object" then . else {} end)
          else . end)
      | .meta as $meta | .raw as $raw
      | if $meta.kind != "handoff" then error("message \($id) is not a handoff") else . end
      | ($raw.files // "1") as $count
      | if ($count | whole | not) or ($count | tonumber) < 1 or ($count | tonumber) > 1000 then
          bad("files is not a number of files from 1 to 1000") else . end
      | range(1; ($count | tonumber) + 1) | (if . == 1 then "" else ".\(.)" end) as $suffix
      | $meta["sha256" + $suffix] as $sha256 | $meta["path" + $suffix] as $path
      | $raw["bytes" + $suffix] as $bytes
      | if ($sha256 | type) != "string" or ($sha256 | test("^[0-9a-fA-F]{64}$") | not) then
          bad("sha256\($suffix) is not a sha256 (64 hex digits)")
        elif ($path | type) != "string" or ($path | startswith("/") | not) or ($path | index("\u0000")) then
          bad("path\($suffix) is not an absolute path")
        elif ($bytes | whole | not) then bad("bytes\($suffix) is not a size in bytes")
        else "\($sha256)\u0000\($path)\u0000\($bytes)\u0000" end' "$found" >"$bus_work/files" 2>"$bus_work/error" \
      || die "$EXIT_USAGE" "$(bus_one_line <"$bus_work/error" | sed 's/^jq: error ([^)]*): //')"
  else
    bus_usage_error "give an inbox message id, or a FILE and its SHA256"
  fi
  # busd/handoff.py overall: any mismatch wins, then any unreachable.
  local expected path announced result mismatch=0 unreachable=0 verified=0
  while IFS= read -r -d '' expected && IFS= read -r -d '' path && IFS= read -r -d '' announced; do
    result=$(bus_verify_file "$path" "$expected" "$announced")
    case "$result" in
      verified) verified=1 ;;
      mismatch) mismatch=1 ;;
      *) unreachable=1 ;;
    esac
    printf '%s\t%s\n' "$result" "$path"
  done <"$bus_work/files"
  if [ "$mismatch" = 1 ]; then exit "$EXIT_REFUSED"; fi
  if [ "$unreachable" = 1 ] || [ "$verified" = 0 ]; then exit "$EXIT_UNREACHABLE"; fi
}

# bus_verify_file PATH SHA256 SIZE: verified, mismatch or unreachable, as busd/handoff.py
# verify_file: only a regular file, read without blocking (a FIFO swapped in meanwhile
# gives an end of file at once) and never past the size it had when looked at; one of
# another size than the handoff announced is a mismatch unread.
bus_verify_file() {
  local path=$1 expected=$2 announced=$3 size actual
  if [ ! -f "$path" ] || [ ! -r "$path" ] || ! size=$(stat -L -c %s -- "$path" 2>/dev/null); then
    echo unreachable
  elif [ -n "$announced" ] && [ "$size" != "$announced" ]; then
    echo mismatch
  elif ! actual=$(set -o pipefail
                  dd if="$path" iflag=nonblock,count_bytes bs=1M count="$size" status=none 2>/dev/null \
                    | sha256sum); then
    echo unreachable
  elif [ "${actual%% *}" = "${expected,,}" ]; then
    echo verified
  else
    echo mismatch
  fi
}

cmd_status() {
  bus_args ID... -- "$@"
  [ "${#bus_rest[@]}" -gt 0 ] || bus_usage_error "give at least one message ID"
  local id query="/status?"
  for id in "${bus_rest[@]}"; do
    case "$id" in ''|*[!0-9]*) bus_usage_error "not a message id: $id" ;; esac
    query+="id=$id&"
  done
  bus_fetch "${query%&}"
  jq -r "$BUS_JQ status_lines" "$bus_work/reply"
}

cmd_agents() {
  bus_args -- "$@"
  bus_fetch /agents
  jq -e 'type == "array"' "$bus_work/reply" >/dev/null \
    || die "$EXIT_UNREACHABLE" "GET /agents did not answer a list; is AGENT_BUS_URL pointing at an agent-bus?"
  jq -r "$BUS_JQ agents_table" "$bus_work/reply"
}

cmd_health() {
  bus_args -- "$@"
  bus_fetch /healthz
  jq -c . "$bus_work/reply"
}

cmd_channels() {
  bus_args -- "$@"
  bus_fetch /channels
  jq . "$bus_work/reply"
}

cmd_read() {
  bus_args CHANNEL AGENT --wait -- "$@"
  { bus_given arg_CHANNEL && bus_given arg_AGENT; } || bus_usage_error "give a CHANNEL and an AGENT"
  bus_start
  bus_require_url
  local query seconds=15
  query="/messages?channel=$(bus_uri "$arg_CHANNEL")&agent=$(bus_uri "$arg_AGENT")"
  # A waiting read is held up to the bus's hold (25 s, at most 30): wait 35 s, as recv does.
  if [ "$opt_wait" = 1 ]; then query+="&wait=true"; seconds=35; fi
  bus_call "$query" "$bus_work/reply" "" "$seconds"
  jq . "$bus_work/reply"
}

cmd_agent_card() {
  bus_args -- "$@"
  bus_fetch /.well-known/agent-card.json
  jq . "$bus_work/reply"
}

# bus_main COMMAND ARG...: run bus-COMMAND (the entry points in bin/ call this).
bus_main() {
  bus_cmd=${1//-/_}
  bus_prog=bus-$1
  shift
  "cmd_$bus_cmd" "$@"
}

# -- usage: what `bus-X -h` prints ------------------------------------------------------

usage_send() {
  cat <<'USAGE'
usage: bus-send TO [--channel C] [--from NAME] [--key K] [--meta JSON] [--allow-secret]

Send standard input, byte for byte, as one message to TO ('*' for everyone on the
channel). Prints the bus's JSON acknowledgement, as `agent-bus send` does.

  --channel C    channel (default $AGENT_BUS_CHANNEL or 'default')
  --from NAME    sender name (default $AGENT_NAME)
  --key K        idempotency key: sending the same key again stores nothing new
  --meta JSON    a flat JSON object of extra fields
  --allow-secret send even if the body looks like a key or credential

A body that looks like a private key or credential is refused (exit 1): send such
things as a file with bus-handoff, which sends only its sha256 and path.

Environment: AGENT_BUS_URL (required), AGENT_NAME, AGENT_BUS_CHANNEL, AGENT_BUS_TOKEN,
AGENT_BUS_KEY (sign with this Ed25519 key; needs openssl), AGENT_BUS_UA, AGENT_BUS_CA.
Exit codes: 0 sent, 1 refused (by the bus, or by the secret guard), 2 usage or
configuration, 3 bus unreachable or failing (network, 5xx).
USAGE
}

usage_recv() {
  cat <<'USAGE'
usage: bus-recv [NAME] [--channel C] [--once] [--since TS] [--no-cursor]

Long-poll the bus for NAME's messages (default $AGENT_NAME) and print each as a block:
'[HH:MM:SSZ] from SENDER:', the body, '---'. The cursor is kept in
$AGENT_BUS_STATE_DIR/NAME@CHANNEL.cursor, the same file `agent-bus recv` keeps, so a
restart neither skips nor repeats. Errors are retried with backoff (0.5 s to 10 s).

  --channel C    channel, or '*' for all (default $AGENT_BUS_CHANNEL or 'default')
  --once         wait for one batch (up to the hold time), print it, and exit
  --since TS     start after this ts instead of the saved cursor
  --no-cursor    keep no cursor file (also AGENT_BUS_NO_CURSOR=1); starts from now

Environment: AGENT_BUS_URL (required), AGENT_NAME, AGENT_BUS_CHANNEL, AGENT_BUS_TOKEN,
AGENT_BUS_UA, AGENT_BUS_CA, AGENT_BUS_STATE_DIR (default
~/.local/state/agent-bus/cursors), AGENT_BUS_NO_CURSOR. Exit codes: 0 done, 1 refused
by the bus (4xx), 2 usage or configuration, 3 bus unreachable or failing (--once).
USAGE
}

usage_listen() {
  cat <<'USAGE'
usage: bus-listen [NAME] [--channel C] [--dir DIR] [--full FILE] [--summary FILE]
                  [--heartbeat FILE] [--since TS] [--once]

Long-poll the bus for NAME's messages (default $AGENT_NAME) and append each, exactly
once, as one JSON line to the full log and as 'ts<TAB>from<TAB>first 120 characters'
(newlines shown as ' | ', tabs and carriage returns as spaces) to the summary log.
The heartbeat file is touched after every successful poll: its age says how current
the logs are. The cursor, <dir>/NAME@CHANNEL.cursor, moves only after a batch is
logged. Prints nothing; errors go to stderr and are retried with backoff (0.5 s to
10 s). For example: nohup bus-listen spark 2>>listen.err & tail -f <dir>/spark@default.tsv

  --channel C       channel, or '*' for all (default $AGENT_BUS_CHANNEL or 'default')
  --dir DIR         folder for the logs, heartbeat and cursor (default
                    $AGENT_BUS_LISTEN_DIR or ~/.local/state/agent-bus/listen)
  --full FILE       the full log (default <dir>/NAME@CHANNEL.jsonl)
  --summary FILE    the summary log (default <dir>/NAME@CHANNEL.tsv)
  --heartbeat FILE  the heartbeat file (default <dir>/NAME@CHANNEL.heartbeat)
  --since TS        start after this ts instead of the saved cursor
  --once            one poll (waiting up to the hold time), then exit

Environment: AGENT_BUS_URL (required), AGENT_NAME, AGENT_BUS_CHANNEL, AGENT_BUS_TOKEN,
AGENT_BUS_UA, AGENT_BUS_CA, AGENT_BUS_LISTEN_DIR. Exit codes: 0 done, 1 refused by the
bus (4xx), 2 usage or configuration, 3 bus unreachable or failing (--once).
USAGE
}

usage_drop() {
  cat <<'USAGE'
usage: bus-drop TO [--channel C] [--from NAME]

Write standard input, byte for byte, into NAME's outbox as one file addressed to TO
('*' for everyone on the channel), atomically, and print the file's path. The daemon
(agent-bus agent NAME) sends it; it need not be running yet. The file starts with a
header block (---bus, to: TO, channel: C, ---), so any body arrives unchanged.

  --channel C    channel (default: the daemon's channel)
  --from NAME    whose outbox (default $AGENT_NAME)

Environment: AGENT_NAME, AGENT_BUS_SPOOL (default ${XDG_STATE_HOME:-~/.local/state}/agent-bus).
Needs no network. Exit codes: 0 dropped, 2 usage, configuration or a body that can
never be sent (binary).
USAGE
}

usage_inbox() {
  cat <<'USAGE'
usage: bus-inbox [NAME] [--read ID] [--body]

List the messages in NAME's inbox/ (default $AGENT_NAME), oldest first, one line each:
id<TAB>time<TAB>from<TAB>first 120 characters (newlines shown as ' | ', other control
characters as spaces). With --read ID, print that message's file: headers, a blank
line, the body; its sender then sees it `read` (told to the bus at once, or with the
next read if the bus cannot be reached now).

  --read ID    print the message with this id, and tell the bus it was read
  --body       with --read: print only the body, byte for byte

Environment: AGENT_NAME, AGENT_BUS_SPOOL (default ${XDG_STATE_HOME:-~/.local/state}/agent-bus);
with --read also AGENT_BUS_URL, AGENT_BUS_TOKEN, AGENT_BUS_UA, AGENT_BUS_CA. Listing needs
no network. Exit codes: 0 done, 1 no message with that id, 2 usage or configuration.
USAGE
}

usage_handoff() {
  cat <<'USAGE'
usage: bus-handoff --to NAME FILE... [--note TEXT] [--channel C] [--from NAME]

Make each FILE private (chmod 0600), hash it, and send one message with each file's
sha256, absolute path, host, size, line count and mtime (in meta, and one readable
line per file: 'hits.csv: lines=8 sha256=<hex> at host:/abs/path'). The content stays
here. Prints the bus's JSON acknowledgement, as `agent-bus handoff` does.

  --to NAME      recipient name, or '*'
  --note TEXT    a line of text to send along (refused if it looks like a secret)
  --channel C    channel (default $AGENT_BUS_CHANNEL or 'default')
  --from NAME    sender name (default $AGENT_NAME)

Environment: AGENT_BUS_URL (required), AGENT_NAME, AGENT_BUS_CHANNEL, AGENT_BUS_TOKEN,
AGENT_BUS_KEY (sign with this Ed25519 key; needs openssl), AGENT_BUS_UA, AGENT_BUS_CA.
Exit codes: 0 sent, 1 refused (by the bus, or a note that looks like a secret),
2 usage, configuration or a file that cannot be handed off, 3 bus unreachable or failing.
USAGE
}

usage_verify() {
  cat <<'USAGE'
usage: bus-verify ID [--name NAME]
       bus-verify FILE SHA256

Recompute a handed-off file's sha256. Give an inbox message id (the handoff as the
daemon filed it in NAME's inbox/), or a FILE and the expected SHA256. Prints one line
per file, 'verified', 'mismatch' or 'unreachable', a tab, and its path. Only a regular
file is read, without blocking; with an id, a file whose size is not the one handed off
is a mismatch without being read, and no more than that size is ever read.

  --name NAME    whose inbox (default $AGENT_NAME)

Environment: AGENT_NAME, AGENT_BUS_SPOOL (default ${XDG_STATE_HOME:-~/.local/state}/agent-bus).
Needs no network. Exit codes: 0 verified, 1 mismatch, 2 usage or configuration (no such
message, not a handoff), 3 unreachable (a file that cannot be read here).
USAGE
}

usage_status() {
  cat <<'USAGE'
usage: bus-status ID...

Print each message's receipt state, one line per recipient: id<TAB>state<TAB>recipient.
queued: stored; delivered: the recipient fetched it; filed: its daemon's inbox file is
durable; read: it was shown to the recipient's model (a hook, an MCP tool) or person.
A broadcast has a line per agent known to read its channel. You see your own
messages (admins: all); others show as unknown. Same bytes as `agent-bus status`.

Environment: AGENT_BUS_URL (required), AGENT_BUS_TOKEN, AGENT_BUS_UA, AGENT_BUS_CA.
Exit codes: 0 done, 1 refused by the bus (4xx), 2 usage or configuration, 3 bus
unreachable or failing (network, 5xx).
USAGE
}

usage_agents() {
  cat <<'USAGE'
usage: bus-agents

Print the bus's roster (GET /agents) as a table: name, online, last contact (UTC),
messages waiting per channel, role and identity. Empty cells show '-'. Same bytes as
`agent-bus agents`.

Environment: AGENT_BUS_URL (required), AGENT_BUS_TOKEN, AGENT_BUS_UA, AGENT_BUS_CA.
Exit codes: 0 done, 1 refused by the bus (4xx), 2 usage or configuration, 3 bus
unreachable or failing (network, 5xx).
USAGE
}

usage_health() {
  cat <<'USAGE'
usage: bus-health

Print the bus's health (GET /healthz) as JSON, as `agent-bus health` does.

Environment: AGENT_BUS_URL (required), AGENT_BUS_TOKEN, AGENT_BUS_UA, AGENT_BUS_CA.
Exit codes: 0 up, 1 refused by the bus (4xx), 2 usage or configuration, 3 bus
unreachable or failing (network, 5xx).
USAGE
}

usage_channels() {
  cat <<'USAGE'
usage: bus-channels

Print every channel with its message count and the time of its newest message, newest
first (GET /channels), as JSON indented by two, as `agent-bus channels` (and el-ipc's
`channels`) does. Once auth is on it needs an admin token.

Environment: AGENT_BUS_URL (required), AGENT_BUS_TOKEN, AGENT_BUS_UA, AGENT_BUS_CA.
Exit codes: 0 done, 1 refused by the bus (4xx), 2 usage or configuration, 3 bus
unreachable or failing (network, 5xx).
USAGE
}

usage_read() {
  cat <<'USAGE'
usage: bus-read CHANNEL AGENT [--wait]

Print what AGENT has not read yet on CHANNEL, oldest first (GET /messages; at most
1,000, read again for the rest), as `agent-bus read` (and el-ipc's `read`) does: a JSON
list of {id, sender, content, timestamp, signed?} indented by two, '[]' when there is
nothing. AGENT's watermark on CHANNEL moves past them.

  --wait         if nothing is unread, wait until a message comes or the bus's hold
                 ends (25 s; then '[]')

Environment: AGENT_BUS_URL (required), AGENT_BUS_TOKEN, AGENT_BUS_UA, AGENT_BUS_CA.
Exit codes: 0 done, 1 refused by the bus (4xx), 2 usage or configuration, 3 bus
unreachable or failing (network, 5xx).
USAGE
}

usage_agent_card() {
  cat <<'USAGE'
usage: bus-agent-card

Print the bus's agent card (GET /.well-known/agent-card.json) as JSON indented by two,
as `agent-bus agent-card` (and el-ipc's `agent-card`) does: an A2A v1.0 card with
el-ipc's url, authentication schemes and, once an operator exists, its did:key.

Environment: AGENT_BUS_URL (required), AGENT_BUS_TOKEN, AGENT_BUS_UA, AGENT_BUS_CA.
Exit codes: 0 done, 1 refused by the bus (4xx), 2 usage or configuration, 3 bus
unreachable or failing (network, 5xx).
USAGE
}
