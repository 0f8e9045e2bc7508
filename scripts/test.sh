#!/usr/bin/env bash
# The whole meshflow test suite, runnable on a fresh machine. It sets up what it needs:
#   - the buf CLI (npm, pinned in package-lock.json) for contract lint and format checks;
#   - a throwaway PostgreSQL cluster in a temporary directory (installed with apt-get if missing);
#   - a Python virtualenv (.venv) with the pinned gRPC client packages.
# Then: rustfmt, buf lint + format, buf breaking and migration immutability against the previous
# commit, clippy -D warnings, the Rust tests on SQLite, the same tests on
# PostgreSQL, and the Python client tests against the real binary. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# PostgreSQL-only tests are named `postgres_only_…`: the SQLite pass leaves them out (they would
# fail there), the PostgreSQL pass runs every test.
if cargo nextest --version >/dev/null 2>&1; then
  run_tests() { cargo nextest run --workspace --locked --no-fail-fast "$@"; }
  run_sqlite_tests() { run_tests -E 'not test(/postgres_only_/)'; }
else
  echo "cargo-nextest not found; using cargo test" >&2
  run_tests() { cargo test --workspace --locked --no-fail-fast "$@"; }
  run_sqlite_tests() { run_tests -- --skip postgres_only_; }
fi

step "rustfmt"
cargo fmt --all -- --check

step "contracts: buf lint and format"
if [ ! -x node_modules/.bin/buf ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
node_modules/.bin/buf lint
node_modules/.bin/buf format --diff --exit-code

step "contracts and migrations against the previous commit"
# A change that breaks clients of the contracts needs a new package version, and a migration that
# has landed is never edited: the schema moves forward with a new one. MESHFLOW_BASE_REF names
# another commit to compare with.
base="${MESHFLOW_BASE_REF:-HEAD~1}"
if git rev-parse --verify -q "$base^{commit}" >/dev/null; then
  node_modules/.bin/buf breaking --against ".git#ref=$base"
  edited=$(git diff --name-only --diff-filter=MDR "$base" -- migrations/src | grep '/m[0-9]' || true)
  if [ -n "$edited" ]; then
    echo "landed migrations were edited or removed (add a new migration instead):" >&2
    echo "$edited" >&2
    exit 1
  fi
else
  echo "no commit $base to compare with: skipped"
fi

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "the server binary carries no test support"
if cargo tree --locked -p meshflow -e normal,features -i meshflow-kit | grep -q '"testing"'; then
  echo "meshflow-kit's testing feature is enabled in the server binary" >&2
  exit 1
fi

step "tests on SQLite"
# Each test makes its SQLite file here (meshflow_kit::testing::sqlite_test_dir).
test_dbs="${TMPDIR:-/tmp}/meshflow-test-databases"
trap 'rm -rf "$test_dbs"' EXIT
run_sqlite_tests
rm -rf "$test_dbs"

step "PostgreSQL: throwaway cluster"
pgdir=$(mktemp -d /tmp/meshflow-pg.XXXXXX)
cleanup() { scripts/postgres.sh stop "$pgdir"; rm -rf "$pgdir" "$test_dbs"; }
trap cleanup EXIT
pg_url=$(scripts/postgres.sh start "$pgdir")
echo "$pg_url"

step "tests on PostgreSQL"
MESHFLOW_TEST_POSTGRES_URL="$pg_url" run_tests

step "Python client tests"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
cargo build --locked -p meshflow
MESHFLOW_BIN="${CARGO_TARGET_DIR:-$(pwd)/target}/debug/meshflow" .venv/bin/python -m pytest -q tests/python

step "all checks passed"
