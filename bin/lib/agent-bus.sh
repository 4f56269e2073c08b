# shellcheck shell=bash disable=SC2034  # the variables are for the scripts that source this
# bin/lib/agent-bus.sh: what every bin/bus-* script shares. Sourced, never run.
#
# The scripts mirror the `agent-bus` commands with nothing but bash, curl (7.55 or
# newer) and jq (1.6 or newer): same environment, same output bytes, same exit codes.
# GNU coreutils (sha256sum, stat) hash handoffs; openssl (1.1.1 or newer) signs sends.

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
bus_key=${AGENT_BUS_KEY:-}
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
#   monitor_block, summary_line, agents_table: the formats of busd/framing.py,
#                busd/listener.py and busd/cli/directory.py.
#   frame_escape busd/framing.py's escape rule, byte for byte: a body segment (the
#                body's start, and after each control character but tab, U+2028 and
#                U+2029) that begins with backslashes, blanks, then ---, [, handoff:
#                or note: gets one backslash more. Written without a global regex
#                (jq 1.6 takes quadratic time for those): one pass over the codepoints.
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
def shown_name: if type == "string" and test("^[A-Za-z0-9._-]{1,64}$") and test("[^.]") then . else py_json end;
def frame_form: "(\\A|[\u0000-\b\n-\u001f\u007f-\u009f\u2028\u2029])\\\\*[ \t]*(---|\\[|[Hh][Aa][Nn][Dd][Oo][Ff][Ff]:|[Nn][Oo][Tt][Ee]:)";
def frame_escape:
  if test(frame_form) | not then . else
  explode as $c | ($c | length) as $n
  | def brk: . <= 8 or (. >= 10 and . <= 31) or (. >= 127 and . <= 159) or . == 8232 or . == 8233;
    def form:
      (until(. >= $n or $c[.] != 92; . + 1) | until(. >= $n or ($c[.] != 32 and $c[.] != 9); . + 1)) as $m
      | $c[$m:$m + 8] | map(if . >= 65 and . <= 90 then . + 32 else . end) | implode
      | startswith("---") or startswith("[") or startswith("handoff:") or startswith("note:");
    [0, (range(0; $n) | select($c[.] | brk) | . + 1)] | map(select(form)) as $at
  | ([0] + $at) as $from | ($at + [$n]) as $to
  | [range(0; $from | length) as $i | (if $i > 0 then 92 else empty end), $c[$from[$i]:$to[$i]][]]
  | implode end;
def monitor_block: "[\(.ts | floor | strftime("%H:%M:%S"))Z] from \(.from | shown_name):\n\(.msg // "" | tostring | frame_escape)\n---";
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

bus_abspath() {  # bus_abspath PATH: PATH made absolute as os.path.abspath does (no link resolved)
  local path=$1 rest part lead=/
  local -a kept=()
  if [[ $path != /* ]]; then
    # The physical working folder, as os.getcwd() gives it; the x keeps a trailing newline.
    rest=$(pwd -P && printf x)
    path=${rest%$'\nx'}/$path
  fi
  # POSIX leaves a leading "//" to the system, and normpath keeps it (but not "///").
  if [[ $path == //* && $path != ///* ]]; then lead=//; fi
  rest=$path/
  while [ -n "$rest" ]; do
    part=${rest%%/*}
    rest=${rest#*/}
    case "$part" in
      ""|.) ;;
      ..) if [ "${#kept[@]}" -gt 0 ]; then unset 'kept[-1]'; fi ;;
      *) kept+=("$part") ;;
    esac
  done
  local IFS=/
  printf '%s' "$lead${kept[*]}"
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

# -- sending: the secret guard, signing, the /send request (busd/client.py send) -------

# The secret guard of busd/secretguard.py as jq definitions: find_secret($set) is the
# name of the first secret-looking thing in the input string, or null. The shapes are
# the Python ones, in the same order, with jq's regex engine (Oniguruma) in place of
# Python's re; where the two engines differ, the text spells Python's meaning out:
#   ws         Python's \s: exactly the characters str.isspace() accepts
#   wb, we     Python's \b before and after a word ([\p{L}\p{N}_]) character
#   labelled   the look-behind for "the 24 characters before end in a digest label"
#              (_DIGEST_LABEL): one fixed-length look-behind per label and separator
#              count, as Oniguruma allows only those; a label may be followed by one
#              more newline, as Python's $ allows.
# A look-behind cannot hold (?i), so the labels spell both cases out ([Ss][Hh][Aa]).
# Oniguruma's (?i) also folds "ß" to "ss"; Python's does not. Both differences can only
# make the shell refuse a little more, never less.
# shellcheck disable=SC2016  # jq's $variables, not the shell's
BUS_GUARD_JQ='
def ws: "\t\n\u000b\f\r\u001c-\u001f \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";
def wb: "(?<![\\p{L}\\p{N}_])";
def we: "(?![\\p{L}\\p{N}_])";
def b58: "1-9A-HJ-NP-Za-km-z";
def shapes: [
  ["a PEM private key", "-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"],
  ["a cloud service-account key file", "\"private_key(?:_id)?\"[\(ws)]*:[\(ws)]*\""],
  ["an AWS access key id", "\(wb)(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\(we)"],
  ["an AWS secret access key",
   "(?i)aws.{0,30}?(?:secret|private).{0,30}?[:=][\(ws)]*[\u0027\"]?[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])"],
  ["a Google API key", "\(wb)AIza[0-9A-Za-z_\\-]{35}(?![0-9A-Za-z_\\-])"],
  ["an Azure storage key", "AccountKey=[A-Za-z0-9+/=]{40,}"],
  ["a GitHub token", "\(wb)(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})"],
  ["a GitLab token", "\(wb)glpat-[A-Za-z0-9_\\-]{20,}"],
  ["a Slack token", "\(wb)xox[abposr]-[A-Za-z0-9\\-]{10,}"],
  ["a Stripe secret key", "\(wb)[sr]k_(?:live|test)_[A-Za-z0-9]{16,}"],
  ["an API secret key (sk-...)", "\(wb)sk-(?:ant-|proj-)?[A-Za-z0-9_\\-]{20,}"],
  ["an agent-bus token", "\(wb)abt_[A-Za-z0-9_\\-]{30,}"],
  ["a JSON web token", "\(wb)eyJ[A-Za-z0-9_\\-]{8,}\\.eyJ[A-Za-z0-9_\\-]{8,}\\.[A-Za-z0-9_\\-]{8,}"],
  ["a bearer token", "\(wb)(?i)bearer[\(ws)]+[A-Za-z0-9._~+/\\-]{20,}"],
  ["a password or secret in an assignment",
   "\(wb)(?i)(?:password|passwd|pwd|passphrase|secret|api[_-]?key|access[_-]?token|auth[_-]?token|client[_-]?secret|private[_-]?key)\(we)[\(ws)]*[:=][\(ws)]*[\u0027\"]?[^\(ws)\u0027\"]{8,}"],
  ["a URL with a password in it", "\(wb)[a-z][a-z0-9+.\\-]{0,30}://[^\(ws):/@]+:[^\(ws)@/]{3,}@"],
  ["an extended private key (xprv)", "\(wb)[xyzt]prv[\(b58)]{100,}"],
  ["a WIF private key", "(?<![\(b58)])[5KL][\(b58)]{50,51}(?![\(b58)])"],
  ["a long base58 secret", "(?<![\(b58)])[\(b58)]{80,90}(?![\(b58)])"]
];
def labelled:
  ["sha256", "sha-256", "sha256sum", "sha", "digest", "hash", "checksum", "txid", "tx",
   "block", "commit"]
  | map(explode | map(if 97 <= . and . <= 122 then "[\([. - 32, .] | implode)]" else [.] | implode end) | add)
  | map(. as $word | (range(0; 5) | "\($word)[\(ws)\"\u0027:=(]{\(.)}"), "\($word)[\(ws)\"\u0027:=(]{4}\n")
  | map("(?<!\(.))") | add;
def hex64: "(?<![0-9A-Fa-f])(?=(?:0x)?[0-9A-Fa-f]{64}(?![0-9A-Fa-f]))\(labelled)"
  + "(?:0x|(?<!(?<![0-9A-Fa-f])0x))[0-9A-Fa-f]{64}(?![0-9A-Fa-f])";
def bip39_set: split("\n") | map(select(. != "") | {key: ., value: true}) | from_entries;
def seed_phrase($set):
  sub("\\A[\(ws)]+"; "") | sub("[\(ws)]+\\z"; "")
  # Plain splits: a regex split in jq 1.6 takes time quadratic in the length.
  | split("\t") | join(" ") | split("\r") | join(" ") | split("\n") | join(" ")
  | reduce (split(" ")[] | select(. != "")) as $token (0;
      if . >= 12 then .
      else ($token | until(startswith(".") or startswith(",") or startswith(";") | not; .[1:])
          | until(endswith(".") or endswith(",") or endswith(";") | not; .[:-1])) as $word
        | if $set[$word] == true then . + 1 else 0 end
      end)
  | . >= 12;
def find_secret($set):  # $set: the BIP-39 word list made into an object by bip39_set
  . as $text
  | first(shapes[] | select(.[1] as $re | $text | test($re)) | .[0])
    // if test(hex64) then "an unlabelled 64-hex-digit key"
       elif seed_phrase($set) then "a seed phrase (12 or more BIP-39 words in a row)"
       else null end;
'

# bus_secret_refusal FILE: why the text in FILE must not be sent, in the words of
# busd/secretguard.py refusal() (pointing at bus-handoff), or nothing when it looks clean.
# The BIP-39 word list lies beside this file once installed (install.sh copies it there
# from busd/data/) and in busd/data/ of a checkout.
bus_secret_refusal() {
  local lib_dir=${BASH_SOURCE[0]%/*}
  local words=$lib_dir/bip39-english.txt
  [ -r "$words" ] || words=$lib_dir/../../busd/data/bip39-english.txt
  [ -r "$words" ] \
    || die "$EXIT_USAGE" "the secret guard's word list is missing: copy busd/data/bip39-english.txt of agent-bus into $lib_dir/ (./install.sh does)"
  jq -Rrs --rawfile words "$words" "$BUS_GUARD_JQ"'
    find_secret($words | bip39_set) // empty
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
    "$bus_work/signed" >"$request.tmp"
  mv -f -- "$request.tmp" "$request"
}

# bus_post_send REQUEST: POST the /send request in REQUEST (signed first when
# AGENT_BUS_KEY is set) and print the acknowledgement as `agent-bus send` prints it, or
# exit with the bus's message and code. A 409 with code 40902 says our own earlier
# signed send with this key was stored: that is success, as in busd/client.py.
bus_post_send() {
  local request=$1 status=0
  if [ -n "$bus_key" ]; then bus_sign_request "$request"; fi
  bus_http /send "$bus_work/reply" "$request" || status=$?
  if [ "$status" -eq "$EXIT_REFUSED" ] \
      && jq -e 'type == "object" and .code == 40902' "$bus_work/reply" >/dev/null 2>&1; then
    jq --slurpfile request "$request" \
      '{ok: true, ts: .ts, channel: $request[0].channel, id: .id, duplicate: true}' \
      "$bus_work/reply" >"$bus_work/reply.tmp"
    mv -f -- "$bus_work/reply.tmp" "$bus_work/reply"
  elif [ "$status" -ne 0 ]; then
    die "$status" "$bus_error"
  fi
  jq -r "$BUS_JQ py_json" "$bus_work/reply"
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
