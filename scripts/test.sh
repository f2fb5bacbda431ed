#!/usr/bin/env bash
# The project's test command: lint, type-check, then the whole pytest suite (unit and
# end-to-end). Extra arguments go to pytest, e.g. `scripts/test.sh -k harness -x`.
# End-to-end tests need root; WEFT_REQUIRE_NETNS=1 makes them fail rather than skip where
# their capabilities are missing, and "no tests ran" counts as a failure.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# Everything the tests need, on a fresh machine too (quick when it is already set up).
scripts/setup.sh
VENV=${WEFT_VENV:-$PWD/.venv}
# shellcheck disable=SC1091
source "$VENV/bin/activate"

echo "== ruff check ."
ruff check .
echo "== mypy weft_core plugins"
mypy weft_core plugins
echo "== pytest"
status=0
WEFT_REQUIRE_NETNS=1 python -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: treating as failure" >&2
    exit 1
fi
exit "$status"
