#!/bin/sh
# Dump the story database to BACKUP_DIR, then delete dumps older than the retention.
#
# One run, one dump: the prod compose file's `backup` service calls this on a
# schedule; operators and tests call it directly. POSIX sh, pg_dump and find.
#
# Connection: DATABASE_URL (postgresql://user:password@host:port/db) when set,
# otherwise libpq's own variables (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE).
#
# Environment:
#   BACKUP_DIR             where dumps go (required; created if missing)
#   BACKUP_RETENTION_DAYS  delete this script's dumps older than N days (default 7;
#                          0 keeps everything)
#   BACKUP_FORMAT          custom (default: pg_dump's compressed archive, restored
#                          with pg_restore) or plain (gzip-compressed SQL, psql)
#   BACKUP_PREFIX          file-name prefix (default "stories")
#
# Files: <prefix>_<UTC timestamp>.dump or .sql.gz, written under a temporary
# name and renamed only once complete and readable, so a half-written dump never
# looks like a backup. BACKUP_DIR/.last_success is touched after each success
# (the compose health check reads its age). A temporary file untouched for an
# hour (its run was killed) is deleted at the next run. Exit status: 0 on success.
set -eu

log() {
    printf '%s backup: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2
}

fail() {
    log "error: $*"
    exit 1
}

: "${BACKUP_DIR:?BACKUP_DIR must name the directory to write dumps to}"
retention_days="${BACKUP_RETENTION_DAYS:-7}"
format="${BACKUP_FORMAT:-custom}"
prefix="${BACKUP_PREFIX:-stories}"

case "$retention_days" in
    '' | *[!0-9]*) fail "BACKUP_RETENTION_DAYS must be a whole number of days, got '$retention_days'" ;;
esac
case "$prefix" in
    '' | *[!A-Za-z0-9_-]*) fail "BACKUP_PREFIX may hold letters, digits, '_' and '-' only" ;;
esac

case "$format" in
    custom)
        extension=dump
        ;;
    plain)
        extension=sql.gz
        ;;
    *) fail "BACKUP_FORMAT must be 'custom' or 'plain', got '$format'" ;;
esac

command -v pg_dump >/dev/null 2>&1 || fail "pg_dump not found on PATH"

# Dumps hold every story and prompt: readable by the owner only.
umask 077
mkdir -p "$BACKUP_DIR"

# A run killed outright (SIGKILL, the OOM killer, a host crash) cannot remove its
# temporary file. pg_dump writes as it goes, so one untouched for an hour is
# no running dump's: delete it.
find "$BACKUP_DIR" -maxdepth 1 -type f -name ".${prefix}_*.partial" -mmin +60 -print |
    while IFS= read -r stale; do
        rm -f -- "$stale"
        log "deleted $stale (left by a run that was killed)"
    done

stamp="$(date -u +%Y%m%dT%H%M%SZ)"
final="$BACKUP_DIR/${prefix}_${stamp}.${extension}"
partial="$BACKUP_DIR/.${prefix}_${stamp}.${extension}.partial"
[ -e "$final" ] && fail "$final already exists (two runs in the same second?)"

cleanup() {
    rm -f "$partial"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# DATABASE_URL is passed as --dbname; unset, libpq reads PG* variables.
set --
if [ -n "${DATABASE_URL:-}" ]; then
    set -- "--dbname=$DATABASE_URL"
fi

started="$(date +%s)"
log "dumping ($format) to $final"
if [ "$format" = custom ]; then
    pg_dump --format=custom --compress=6 --no-owner --no-privileges \
        --file="$partial" "$@"
    # Reading the table of contents proves the archive is complete and parseable.
    pg_restore --list "$partial" >/dev/null
else
    # Plain SQL that drops what it recreates, gzip-compressed by pg_dump itself
    # (no pipeline, so no lost exit status).
    pg_dump --format=plain --compress=6 --clean --if-exists --no-owner --no-privileges \
        --file="$partial" "$@"
    gzip -t "$partial"
fi
mv "$partial" "$final"
touch "$BACKUP_DIR/.last_success"
size="$(wc -c <"$final" | tr -d ' ')"
log "wrote $final ($size bytes in $(($(date +%s) - started)) s)"

# Retention: only files this script names, only after a successful dump, never
# the one just written, and never below one day.
if [ "$retention_days" -gt 0 ]; then
    minutes=$((retention_days * 24 * 60))
    find "$BACKUP_DIR" -maxdepth 1 -type f \
        \( -name "${prefix}_*.dump" -o -name "${prefix}_*.sql.gz" \) \
        ! -name "${prefix}_${stamp}.${extension}" \
        -mmin "+$minutes" -print | while IFS= read -r old; do
        rm -f -- "$old"
        log "retention: deleted $old (older than $retention_days days)"
    done
fi

printf '%s\n' "$final"
