#!/usr/bin/env bash
# The whole test suite: linters and type checks, unit and integration tests, end-to-end QEMU boots.
# Installs what it needs first (scripts/setup.sh). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate

echo "== ruff"
ruff check .
echo "== mypy --strict"
# three runs: tests/, qemu-tests/ and bench/ each keep helper modules at their top level (conftest, ...)
mypy bootkit tests
mypy bench
mypy qemu-tests
echo "== shellcheck"
mapfile -t shell_files < <(git ls-files '*.sh' .ci/run 'dracut-module/**')
shellcheck_files=()
for f in "${shell_files[@]}"; do
    case "$f" in *.service|*.rules|*.conf) continue ;; esac
    shellcheck_files+=("$f")
done
shellcheck -x "${shellcheck_files[@]}"
echo "== pytest"
# the slowest tests are listed so that the QEMU budget stays visible in every CI log
exec python -m pytest -ra --durations=30 "$@"
