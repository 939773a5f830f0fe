#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests drive from
# Debian's packages if it is missing (redis-server; the PostgreSQL server
# binaries; chromium), creates .venv with choreo and its test tools, lints,
# runs pytest.
# Extra arguments go to pytest (e.g. `scripts/test.sh -m slow` for the soak tier).
set -euo pipefail
cd "$(dirname "$0")/.."

# apt_install PACKAGE: one Debian package, as root or through sudo.
apt_install() {
    echo "installing $1 from Debian's packages"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$1" >/dev/null
}

command -v redis-server >/dev/null 2>&1 || apt_install redis-server
# The PostgreSQL tests start private clusters with initdb/pg_ctl from
# /usr/lib/postgresql/<major>/bin (never the server the package may start).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_install postgresql
# The dashboard's browser tests drive Debian's chromium through Playwright,
# whose own browser download cannot work on CI machines.
[ -x /usr/bin/chromium ] || apt_install chromium

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'

.venv/bin/ruff check --quiet .
if [ "$#" -eq 0 ]; then
    set -- -m "not slow"
fi
exec .venv/bin/python -m pytest "$@"
