#!/usr/bin/env bash
# Proves the lower bounds in pyproject.toml: installs the project into a fresh virtual environment with
# every dependency it declares ([project].dependencies and the extras that `.[test]` pulls in) pinned to
# its declared lower bound, then runs a smoke subset of the tests (training, the CLI, the data readers,
# the loggers) and prints what was installed.
#
#   scripts/check_min_deps.sh [REPO] [PYTEST ARGS...]
#
# REPO defaults to this script's checkout; PYTEST ARGS replace the default test files.
# Environment: AUTOENC_DATA_DIR (default: REPO/../shared/data, as the tests), PYTHON (the interpreter
# the environment is made from, default python3), MIN_DEPS_EXTRAS (default test), TMPDIR (where the
# throwaway environment goes; it is removed on exit), PIP_CACHE_DIR (pip's cache, as usual).
# The pins are derived from pyproject.toml alone: a bound `name>=X` (or ==X, ~=X) is installed as
# `name==X`, so every lower bound must name a release that exists (`>=2.6` means 2.6.0).
# Exit status: non-zero when the environment cannot be made, a pin cannot be installed or was not the
# version installed, or a test fails.
set -euo pipefail

repo=$(cd "${1:-$(dirname "$0")/..}" && pwd)
shift $(($# > 0 ? 1 : 0))
tests=("$@")
if ((${#tests[@]} == 0)); then
    tests=(tests/test_matrix.py tests/test_core_cli.py tests/test_data.py tests/test_loggers.py)
fi
[[ -f $repo/pyproject.toml ]] || { echo "check_min_deps: no pyproject.toml in $repo" >&2; exit 2; }
export AUTOENC_DATA_DIR="${AUTOENC_DATA_DIR:-$(dirname "$repo")/shared/data}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
extras=${MIN_DEPS_EXTRAS:-test}

work=$(mktemp -d "${TMPDIR:-/tmp}/autoenc-min-deps.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$SECONDS

"${PYTHON:-python3}" -m venv "$work/venv"
py=$work/venv/bin/python

# The pins: one `name==lower-bound` per declared dependency (self-references like autoenc[optuna] are
# followed into those extras). Read with the environment's own Python: tomllib (3.11+) or tomli, and
# packaging (pip's vendored copy where packaging itself is not installed yet).
"$py" - "$repo/pyproject.toml" "$extras" >"$work/pins.txt" <<'PY'
import re
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import pip._vendor.tomli as tomllib
try:
    from packaging.requirements import Requirement
    from packaging.version import Version
except ModuleNotFoundError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
name = re.sub(r"[-_.]+", "-", project["name"]).lower()
optional = project.get("optional-dependencies", {})
pins, seen, todo = {}, set(), [None, *filter(None, sys.argv[2].split(","))]
while todo:
    extra = todo.pop()
    if extra in seen:
        continue
    seen.add(extra)
    if extra is not None and extra not in optional:
        sys.exit(f"check_min_deps: pyproject.toml has no extra {extra!r}")
    for line in project.get("dependencies", []) if extra is None else optional[extra]:
        req = Requirement(line)
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key == name:
            todo += sorted(req.extras)
            continue
        lows = [s.version for s in req.specifier if s.operator in (">=", "==", "~=", "===")]
        if not lows:
            sys.exit(f"check_min_deps: {line!r} has no lower bound to install (>=, == or ~=)")
        low = max(lows, key=Version)
        if key in pins and Version(pins[key][1]) >= Version(low):
            continue  # declared twice (the project and an extra): the higher bound holds
        pins[key] = (req.name, low, f"; {req.marker}" if req.marker else "")
print("\n".join(f"{n}=={low}{marker}" for n, low, marker in (pins[k] for k in sorted(pins))))
PY

echo "check_min_deps: pins from $repo/pyproject.toml (extras: $extras):"
sed 's/^/  /' "$work/pins.txt"
# The pins go in as requirements beside the project's own: pip must satisfy both, so a pin outside a
# declared range fails here, as does a release that does not exist.
if ! "$py" -m pip install -e "$repo[$extras]" -r "$work/pins.txt" >"$work/pip.log" 2>&1; then
    grep -v "^WARNING: Location '" "$work/pip.log" | tail -n 40 >&2
    echo "check_min_deps: pip could not install the project with these pins" >&2
    exit 1
fi

echo "check_min_deps: installed ($((SECONDS - start)) s):"
"$py" - "$work/pins.txt" <<'PY'
import sys
from importlib.metadata import version

try:
    from packaging.requirements import Requirement
    from packaging.version import Version
except ModuleNotFoundError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version

bad = []
for line in open(sys.argv[1]).read().split("\n"):
    if not line.strip():
        continue
    req = Requirement(line)
    if req.marker and not req.marker.evaluate():
        continue
    want, got = next(iter(req.specifier)).version, version(req.name)
    ok = Version(Version(got).public) == Version(want)
    print(f"  {req.name:26} {got:16} {'' if ok else f'!= {want}'}")
    bad += [] if ok else [req.name]
if bad:
    sys.exit(f"check_min_deps: not installed at their lower bound: {', '.join(bad)}")
PY
"$py" -m pip check

echo "check_min_deps: python -m pytest -q -m 'not slow' ${tests[*]} (AUTOENC_DATA_DIR=$AUTOENC_DATA_DIR)"
cd "$repo"
"$py" -m pytest -q -m "not slow" -p no:cacheprovider "${tests[@]}"
echo "check_min_deps: passed at the declared lower bounds ($((SECONDS - start)) s)"
