#!/usr/bin/env bash
# Run every command in README.md's bash blocks (other tools' commands sit in text blocks), as written, in order, on a fresh clone of this repository,
# and report pass/fail per command. The only changes are the ones the README names: `train.steps=20` is
# appended to `jaxgpt finetune|rl|dpo`, and `jaxgpt active` runs `--rounds 2`. `jaxgpt serve` is started
# in the background (and stopped after the commands that follow it); `jaxgpt chat` gets "Hello" on stdin.
#
#   bash scripts/readme_check.sh [--skip-tests] [--keep]     (--keep leaves the clone for inspection)
set -uo pipefail
skip_tests=0; keep=0
for arg in "$@"; do
  case "$arg" in --skip-tests) skip_tests=1 ;; --keep) keep=1 ;; *) echo "unknown option $arg" >&2; exit 2 ;; esac
done
src="$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)"
work="$(mktemp -d /tmp/jaxgpt-readme.XXXXXX)"
git clone -q "$src" "$work/jaxgpt" || exit 1
cd "$work/jaxgpt"
echo "fresh clone of $(git rev-parse --short HEAD) in $work/jaxgpt"

mapfile -t commands < <(python3 - <<'PY'
import re
text = open("README.md").read()
for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():  # continued lines are one command
        if line.lstrip().startswith("#"):
            continue
        for part in line.split("&&"):
            if part.strip():
                print(part.strip())
PY
)

server_pid=""
stop_server() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null; server_pid=""; }
trap stop_server EXIT
results=(); failed=0; n=0
for cmd in "${commands[@]}"; do
  n=$((n + 1)); run="$cmd"; note=""
  case "$cmd" in
    "jaxgpt finetune "*|"jaxgpt rl "*|"jaxgpt dpo "*)
      run="${cmd%%#*} train.steps=20"; note=" [+ train.steps=20]" ;;
    "jaxgpt active "*)
      run="$(sed -E 's/--rounds [0-9]+/--rounds 2/' <<<"${cmd%%#*}")"; note=" [--rounds 2]" ;;
  esac
  if [[ "$cmd" == *"python -m pytest"* && $skip_tests == 1 ]]; then
    results+=("SKIP      -  $cmd"); continue
  fi
  log="$work/cmd_$n.log"; t0=$(date +%s)
  if [[ "$cmd" == "source "* ]]; then
    eval "$cmd"; status=$?
  elif [[ "$cmd" == "jaxgpt serve "* ]]; then
    stop_server
    bash -c "$run" >"$log" 2>&1 & server_pid=$!
    port="$(sed -nE 's/.*--port ([0-9]+).*/\1/p' <<<"$cmd")"; status=1
    for _ in $(seq 600); do
      if curl -sf "127.0.0.1:${port:-8000}/health" >/dev/null 2>&1; then status=0; break; fi
      kill -0 "$server_pid" 2>/dev/null || break
      sleep 0.5
    done
  elif [[ "$cmd" == "jaxgpt chat "* ]]; then
    printf 'Hello\n/exit\n' | bash -c "$run" >"$log" 2>&1; status=$?
  else
    bash -c "$run" >"$log" 2>&1; status=$?
  fi
  secs=$(( $(date +%s) - t0 ))
  if [ "$status" -eq 0 ]; then word=PASS; else word="FAIL($status)"; failed=$((failed + 1)); fi
  results+=("$(printf '%-9s %5ss  %s%s' "$word" "$secs" "$cmd" "$note")")
  if [ "$status" -ne 0 ]; then echo "--- $cmd (last lines of $log)"; tail -5 "$log"; fi
  echo "${results[-1]}"
done
stop_server

echo
cpu="$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ *//')"
echo "README check on $(date -u +%Y-%m-%d), $(nproc) cores, ${cpu:-$(uname -m)}"
printf '%s\n' "${results[@]}"
echo "$(( ${#results[@]} - failed )) of ${#results[@]} passed or skipped; $failed failed"
grep -A12 -m1 '^ROMEO:' "$work"/cmd_3.log 2>/dev/null | sed 's/^/  sample | /'
[ $keep == 1 ] || rm -rf "$work"
[ $failed -eq 0 ]
