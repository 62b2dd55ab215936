# Shell helpers shared by the launch scripts (sourced, not run).

# pip, quietly: its output only when it fails (a machine's pip config can add noise)
pipq() {
    local log; log=$(mktemp)
    if ! "$@" >"$log" 2>&1; then cat "$log" >&2; rm -f "$log"; return 1; fi
    rm -f "$log"
}
