#!/usr/bin/env bash
# Nightly aggregation: `collect --phase all`, then `report`, with a rotating log.
#
# Run it from cron on a login node, or through nightly-aggregate.sbatch from
# scrontab or sbatch. Settings come from the environment:
#
#   QAT_REPO           repository checkout (default: the folder above this script)
#   QAT_WORKDIR        study work directory (default: $QAT_REPO)
#   QAT_VENV           Python virtual environment (default: $QAT_REPO/.venv)
#   QAT_REPORT_PHASES  comma-separated phases for `report`; "none" skips it
#                      (default: every phase whose collected table has rows)
#   QAT_COLLECT_ARGS   extra options for collect, e.g. "--no-wait --jobs 2"
#   QAT_LOG_DIR        log folder (default: $QAT_WORKDIR/logs/nightly)
#   QAT_LOG_MAX_BYTES  rotate collect.log when it is larger (default: 1048576)
#   QAT_LOG_KEEP       rotated logs kept, collect.log.1 .. .N (default: 7)
#
# stdout gets only the collect summary and the report line, so cron mails
# those; the full output of both steps goes to $QAT_LOG_DIR/collect.log.
# Exit status: 0 when both steps succeed, 2 for a bad setting (missing venv or
# workdir), otherwise the status of the first step that failed.
set -uo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=${QAT_REPO:-$(dirname "$script_dir")}
workdir=${QAT_WORKDIR:-$repo}
venv=${QAT_VENV:-$repo/.venv}
report_phases=${QAT_REPORT_PHASES:-}
collect_args=${QAT_COLLECT_ARGS:-}
log_dir=${QAT_LOG_DIR:-$workdir/logs/nightly}
log_max_bytes=${QAT_LOG_MAX_BYTES:-1048576}
log_keep=${QAT_LOG_KEEP:-7}

fail() {
    echo "nightly-aggregate: error: $*" >&2
    exit 2
}

[[ -d $workdir ]] || fail "workdir $workdir not found; set QAT_WORKDIR to the study's work directory"
python=$venv/bin/python
[[ -x $python ]] || fail "no Python at $python; set QAT_VENV to the project's virtual environment (\`make setup\` creates $repo/.venv)"
[[ $log_max_bytes =~ ^[0-9]+$ ]] || fail "invalid QAT_LOG_MAX_BYTES '$log_max_bytes'; expected a whole number of bytes"
[[ $log_keep =~ ^[1-9][0-9]*$ ]] || fail "invalid QAT_LOG_KEEP '$log_keep'; expected a whole number >= 1"
mkdir -p "$log_dir" || fail "cannot create the log folder $log_dir; set QAT_LOG_DIR to a writable folder"
log=$log_dir/collect.log

# Size-based rotation: collect.log -> collect.log.1 -> ... -> collect.log.N, the oldest dropped.
rotate_log() {
    [[ -f $log ]] || return 0
    local size
    size=$(stat -c %s "$log")
    (( size >= log_max_bytes )) || return 0
    local i
    for (( i = log_keep - 1; i >= 1; i-- )); do
        if [[ -f $log.$i ]]; then
            mv -f "$log.$i" "$log.$(( i + 1 ))"
        fi
    done
    mv -f "$log" "$log.1"
}
rotate_log

# collect opens result files without HDF5 file locks, because NFS and some
# Lustre mounts have none. This variable does the same for other HDF5 tools.
export HDF5_USE_FILE_LOCKING=FALSE
cd "$repo" || fail "repository $repo not found; set QAT_REPO to the checkout"

echo "=== $(date '+%Y-%m-%d %H:%M:%S %z') nightly aggregate on $(hostname), SLURM job ${SLURM_JOB_ID:-none}, workdir $workdir" >> "$log"

# shellcheck disable=SC2086  # QAT_COLLECT_ARGS is a list of options
summary=$("$python" -m pipeline --log-level INFO collect --phase all --workdir "$workdir" $collect_args 2>> "$log")
status=$?
if [[ -n $summary ]]; then
    echo "$summary" >> "$log"
    echo "$summary"
fi
if (( status != 0 )); then
    echo "collect failed with exit status $status; the end of $log:"
    tail -n 5 "$log"
    exit "$status"
fi

if [[ -z $report_phases ]]; then
    # Phases whose table has at least one row: report rejects an empty table.
    report_phases=$("$python" - "$workdir" 2>> "$log" <<'EOF'
import sys
from pathlib import Path

import pyarrow.parquet as pq

results = Path(sys.argv[1]) / "results"
names = [p.stem for p in sorted(results.glob("*.parquet")) if pq.ParquetFile(p).metadata.num_rows > 0]
print(",".join(names))
EOF
    )
fi
if [[ $report_phases == none ]]; then
    echo "report skipped: QAT_REPORT_PHASES=none" | tee -a "$log"
    exit 0
fi
if [[ -z $report_phases ]]; then
    echo "report skipped: no phase has collected cells yet" | tee -a "$log"
    exit 0
fi

"$python" -m pipeline --log-level INFO report --phase "$report_phases" --workdir "$workdir" >> "$log" 2>&1
status=$?
if (( status != 0 )); then
    echo "report --phase $report_phases failed with exit status $status; the end of $log:"
    tail -n 5 "$log"
    exit "$status"
fi
echo "report --phase $report_phases written to $workdir/report" | tee -a "$log"
