#!/bin/sh
# Make PostgreSQL's server binaries (initdb, pg_ctl) available for the
# reliability tests' PostgreSQL-backed Prefect server (tests/support/postgres.py).
# Idempotent and fast when they are already there; installs with apt-get
# (Debian/Ubuntu, as root) when they are not. Never fails the build: without
# PostgreSQL the PostgreSQL variants of the tests are skipped with the reason.
set -eu

found() {
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        return 0
    fi
    for dir in /usr/lib/postgresql/*/bin; do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
            return 0
        fi
    done
    return 1
}

if found; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_postgres.sh: PostgreSQL not found and not root (no passwordless sudo); the PostgreSQL tests will be skipped" >&2
        exit 0
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_postgres.sh: PostgreSQL not found and no apt-get here; the PostgreSQL tests will be skipped" >&2
    exit 0
fi

echo "install_postgres.sh: installing PostgreSQL with apt-get" >&2
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql; }; then
    echo "install_postgres.sh: apt-get could not install postgresql; the PostgreSQL tests will be skipped" >&2
    exit 0
fi
found || echo "install_postgres.sh: postgresql installed but initdb/pg_ctl not found" >&2
exit 0
