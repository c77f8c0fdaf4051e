#!/bin/sh
# Restore a dump written by scripts/backup.sh into a PostgreSQL database.
#
#   scripts/restore.sh --yes DUMP            # a .dump (custom) or .sql.gz (plain) file
#   scripts/restore.sh --yes latest          # the newest dump in BACKUP_DIR
#
# Target: DATABASE_URL when set, otherwise libpq's PG* variables. Objects in the
# dump replace their namesakes in the target (tables are dropped and recreated);
# objects the dump does not mention are left alone. The restore runs in a single
# transaction: on any error nothing changes. Because it replaces data it asks for
# --yes (or RESTORE_CONFIRM=yes). Stop the app (or put it in maintenance) first.
set -eu

log() {
    printf '%s restore: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2
}

fail() {
    log "error: $*"
    exit 1
}

usage() {
    printf 'usage: %s [--yes] DUMP_FILE|latest\n' "$0" >&2
    exit 2
}

confirmed="${RESTORE_CONFIRM:-no}"
dump=""
while [ $# -gt 0 ]; do
    case "$1" in
        --yes | -y) confirmed=yes ;;
        -h | --help) usage ;;
        -*) usage ;;
        *)
            [ -z "$dump" ] || usage
            dump="$1"
            ;;
    esac
    shift
done
[ -n "$dump" ] || usage

if [ "$dump" = latest ]; then
    : "${BACKUP_DIR:?BACKUP_DIR must be set to restore the latest dump}"
    prefix="${BACKUP_PREFIX:-stories}"
    # Names embed a sortable UTC timestamp, so the last name is the newest dump.
    dump="$(find "$BACKUP_DIR" -maxdepth 1 -type f \
        \( -name "${prefix}_*.dump" -o -name "${prefix}_*.sql.gz" \) | sort | tail -n 1)"
    [ -n "$dump" ] || fail "no dump found in $BACKUP_DIR"
fi
[ -f "$dump" ] || fail "no such dump: $dump"

if [ "$confirmed" != yes ]; then
    fail "restoring replaces the tables in the target database; rerun with --yes"
fi

set --
if [ -n "${DATABASE_URL:-}" ]; then
    set -- "--dbname=$DATABASE_URL"
fi

log "restoring $dump"
case "$dump" in
    *.dump)
        pg_restore --clean --if-exists --no-owner --no-privileges \
            --single-transaction --exit-on-error "$@" "$dump"
        ;;
    *.sql.gz)
        gzip -t "$dump"
        # psql reads the dump on stdin; its exit status is the one that matters,
        # and gzip -t above already proved the file decompresses.
        gzip -dc "$dump" | psql --quiet --no-psqlrc --set=ON_ERROR_STOP=1 \
            --single-transaction "$@" >/dev/null
        ;;
    *) fail "unknown dump type (expected .dump or .sql.gz): $dump" ;;
esac
log "restored $dump"
