#!/usr/bin/env bash
# Create / refresh the project's virtual environment in .venv/ (idempotent).
#
#   bash scripts/setup_env.sh                   # or: make setup     (torch, mmcv, the toolkits, detectron2)
#   SN_PROFILE=core bash scripts/setup_env.sh   # or: make test-core (torch and the test tools only)
#
# Steps (each skipped when already satisfied):
#   1. .venv/ from ${PYTHON:-python3}; with --system-site-packages when that
#      interpreter already has a working torch + torchvision (e.g. your CUDA build).
#   2. torch/torchvision (TORCH_VERSION / TORCHVISION_VERSION) unless the venv
#      already imports a working pair at least as new as pyproject.toml asks.
#   3. build tools: setuptools, wheel, ninja.
#   4. mmcv from source (--no-build-isolation, MAX_JOBS jobs): the long step, 15-20 min
#      on an idle 2-core machine the first time, seconds later (pip caches the wheel).
#      Full profile only.
#   5. this project: pip install --no-build-isolation -e ".[extras]" under
#      requirements/constraints.txt (exact pins); it compiles the C++ extension.
#   6. detectron2: kept if importable, else its v0.6 Python package without the
#      compiled extension (scripts/install_detectron2.py). Full profile only.
#   7. import check, then the stamp file: the next run returns in seconds. The stamp
#      covers the pins, pyproject.toml, setup.py, these scripts and the extension's
#      C++ sources (sn_plugin/kernels/csrc), so changing any of them reruns the steps.
#
# What you see: each step, pip's own lines and, for source builds, compile progress
# (files done out of the total, time elapsed, an estimate of the time left;
# scripts/setup_progress.py). Everything, pip -v included, goes to the log.
# A failing step stops the set-up with a message naming the step, the log and the
# likely fix. The stamp is deleted before anything changes and written last, so a
# failed or interrupted run is never taken for a finished one; rerunning resumes.
#
# Environment knobs:
#   PYTHON              base interpreter (default python3)
#   SN_VENV             venv path (default <repo>/.venv)
#   SN_PROFILE          full (default) or core (torch + test tools, no toolkits)
#   SN_EXTRAS           extras of sn_plugin to install in the full profile (default all)
#   SN_SETUP_LOG        log file (default <repo>/build/setup_env.log)
#   TORCH_VERSION       default 2.13.0;  TORCHVISION_VERSION default 0.28.0
#   TORCH_INDEX_URL     e.g. https://download.pytorch.org/whl/cu121 (optional)
#   MAX_JOBS            parallel compile jobs (default: nproc, max 8)
#   SN_FORCE=1          ignore the stamp and re-run every step
#   SN_SKIP_DETECTRON2=1  do not install detectron2
#   SN_SHARED_WHEELS    folder of prebuilt wheels pip may take (default <repo>/../shared/wheels)
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="${SN_VENV:-$ROOT/.venv}"
VPY="$VENV/bin/python"
CONSTRAINTS="$ROOT/requirements/constraints.txt"
PROFILE="${SN_PROFILE:-full}"
FULL_EXTRAS="${SN_EXTRAS:-all}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.28.0}"
LOG="${SN_SETUP_LOG:-$ROOT/build/setup_env.log}"
FULL_STAMP="$VENV/.sn_setup_stamp"
CORE_STAMP="$VENV/.sn_setup_stamp_core"
MMCV_PIN="$(sed -n 's/^mmcv==//p' "$CONSTRAINTS")"
T0=$SECONDS

case "$PROFILE" in
    full) EXTRAS="$FULL_EXTRAS"; STAMP="$FULL_STAMP"; STEPS=7 ;;
    core) EXTRAS=test; STAMP="$CORE_STAMP"; STEPS=5 ;;
    *) echo "[setup_env] SN_PROFILE must be 'full' or 'core', not '$PROFILE'" >&2; exit 2 ;;
esac

if [ -z "${MAX_JOBS:-}" ]; then
    MAX_JOBS="$(nproc 2>/dev/null || echo 2)"
    [ "$MAX_JOBS" -gt 8 ] && MAX_JOBS=8
fi
export MAX_JOBS

# Machines of this project's own CI keep a prebuilt mmcv wheel beside the clone
# (../shared/wheels); pip takes it instead of the source build. A user's machine
# has no such folder and builds mmcv from source.
SHARED_WHEELS="${SN_SHARED_WHEELS:-$(cd "$ROOT/.." && pwd)/shared/wheels}"
if [ -d "$SHARED_WHEELS" ]; then
    export PIP_FIND_LINKS="${PIP_FIND_LINKS:+$PIP_FIND_LINKS }$SHARED_WHEELS"
fi

elapsed() { local s=$((SECONDS - T0)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }
log() { printf '[setup_env %s] %s\n' "$(elapsed)" "$*" | tee -a "$LOG"; }

# Does interpreter $1 import torch + torchvision with working C++ ops, torch as new as pyproject.toml asks?
torch_ok() {
    "$1" - "$ROOT/pyproject.toml" <<'EOF' >/dev/null 2>&1
import re, sys
import torch, torchvision
floor = re.search(r'"torch>=([0-9.]+)"', open(sys.argv[1]).read()).group(1)
release = lambda v: tuple(int(p) for p in re.match(r"[0-9]+(\.[0-9]+)*", v).group(0).split("."))
assert release(torch.__version__) >= release(floor), (torch.__version__, floor)
b = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.], [50., 50., 60., 60.]])
keep = torchvision.ops.nms(b, torch.tensor([0.9, 0.8, 0.7]), 0.5)
assert keep.tolist() == [0, 2], keep
EOF
}

stamp_value() {  # stamp_value PROFILE EXTRAS
    local file
    {
        for file in "$CONSTRAINTS" "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT/scripts/setup_env.sh" \
            "$ROOT/scripts/install_detectron2.py"; do
            if [ -f "$file" ]; then cat "$file"; fi
        done
        if [ -d "$ROOT/sn_plugin/kernels/csrc" ]; then
            find "$ROOT/sn_plugin/kernels/csrc" -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum
        fi
        echo "$1 $2 ${SN_SKIP_DETECTRON2:-0} $TORCH_VERSION $TORCHVISION_VERSION"
    } | sha256sum | cut -d' ' -f1
}
stamp_current() { [ -f "$1" ] && [ "$(cat "$1")" = "$(stamp_value "$2" "$3")" ]; }

FULL_IMPORTS='["torch", "torchvision", "mmengine", "mmcv", "mmcv._ext", "mmdet", "mmseg", "mmpretrain", "mmaction", "pycocotools"]'
CORE_IMPORTS='["torch", "torchvision", "pytest"]'
import_check() {  # import_check PROFILE: the profile's packages import; the project is installed (found from
    # outside the checkout, not imported, so that the set-up does not depend on the state of the package code)
    local mods="$CORE_IMPORTS"
    if [ "$1" = full ]; then
        mods="$FULL_IMPORTS"
        [ "${SN_SKIP_DETECTRON2:-0}" = 1 ] || mods="${mods%]}, \"detectron2\"]"
    fi
    (cd / && "$VPY" -c "
import importlib, importlib.util
for m in $mods:
    importlib.import_module(m)
assert importlib.util.find_spec('sn_plugin') is not None, 'sn_plugin is not installed'
")
}

# ---------------------------------------------------------------- fast path
if [ "${SN_FORCE:-0}" != 1 ] && [ -x "$VPY" ] && torch_ok "$VPY"; then
    if { stamp_current "$FULL_STAMP" full "$FULL_EXTRAS" && import_check full >/dev/null 2>&1; } \
        || { [ "$PROFILE" = core ] && stamp_current "$CORE_STAMP" core test && import_check core >/dev/null 2>&1; }; then
        printf '[setup_env] environment in %s is up to date (SN_FORCE=1 to redo)\n' "$VENV"
        exit 0
    fi
fi

# ---------------------------------------------------------------- failure handling
mkdir -p "$(dirname "$LOG")"
: > "$LOG"
STEP_NO=0
STEP="start"

likely_fix() {  # likely_fix MESSAGE: from the message and the failed step's part of the log
    local text
    text="$1
$(sed -n "/^==== step $STEP_NO:/,\$p" "$LOG")"
    if grep -qiE 'No space left on device' <<<"$text"; then
        echo "the disk is full: free space (torch and its CUDA libraries take ~5 GB, pip's cache more) and rerun"
    elif grep -qiE 'Killed signal|Cannot allocate memory|MemoryError|std::bad_alloc' <<<"$text"; then
        echo "the compiler ran out of memory: rerun with fewer parallel jobs, e.g. MAX_JOBS=1 make setup"
    elif grep -qiE 'Python\.h: No such file' <<<"$text"; then
        echo "install the Python development headers (Debian/Ubuntu: apt-get install python3-dev) and rerun"
    elif grep -qiE "command '[^']*(gcc|g\+\+|c\+\+|cc)' failed|(gcc|g\+\+|c\+\+|cc): (command )?not found|Unable to find a compiler|No such file or directory: '[^']*(gcc|g\+\+|c\+\+)'|no C\+\+ compiler" <<<"$text"; then
        echo "install a C++ compiler (Debian/Ubuntu: apt-get install build-essential python3-dev; or set CXX) and rerun"
    elif grep -qiE 'Temporary failure in name resolution|Name or service not known|Failed to establish a new connection|Network is unreachable|Connection (refused|reset)|Read timed out|ConnectTimeoutError|ProxyError|SSLError|CERTIFICATE_VERIFY_FAILED' <<<"$text"; then
        echo "pip could not reach the package index: check the network, a proxy (HTTPS_PROXY) or PIP_INDEX_URL / PIP_CERT, and rerun"
    elif grep -qiE 'No matching distribution found|Could not find a version that satisfies' <<<"$text"; then
        echo "the package index has no pinned version for this Python/platform (see the log for which package): check PIP_INDEX_URL, the network, or the Python version (3.11 is tested)"
    elif grep -qiE 'ninja: build stopped|error: command .* failed with exit (code|status)|fatal error:' <<<"$text"; then
        echo "a C++ compile error: the first 'error:' lines in the log name the file; check the compiler (C++17, gcc >= 9) and that torch matches TORCH_VERSION"
    elif grep -qiE 'ResolutionImpossible|conflicting dependencies' <<<"$text"; then
        echo "pip found conflicting requirements: see the log; an environment of your own may hold versions that clash with requirements/constraints.txt (SN_VENV=<fresh path> sets up a fresh one)"
    else
        echo "see the end of the log for the error"
    fi
}

fail() {  # fail MESSAGE [EXIT-STATUS]
    trap - ERR INT TERM
    local last
    last="$(grep -v -e '^\[setup_env' -e '^==== step' "$LOG" | tail -n 12 | sed 's/^/    /')"
    {
        printf '\n[setup_env] FAILED at step %s/%s (%s) after %s: %s\n' "$STEP_NO" "$STEPS" "$STEP" "$(elapsed)" "$1"
        printf '[setup_env] likely fix: %s\n' "$(likely_fix "$1")"
        printf '[setup_env] full log: %s; its last lines:\n%s\n' "$LOG" "$last"
        printf '[setup_env] nothing was marked as set up: after the fix, run the same make command again (the set-up resumes; SN_FORCE=1 redoes every step)\n'
    } | tee -a "$LOG" >&2
    exit "${2:-1}"
}
trap 'fail "a command exited with status $? (line $LINENO)"' ERR
trap 'fail "interrupted" 130' INT TERM

step() {  # step NUMBER NAME
    STEP_NO=$1 STEP=$2
    printf '==== step %s: %s\n' "$1" "$2" >> "$LOG"
    log "step $1/$STEPS: $2"
}

# vpip LABEL [--build] PIP-ARGS...: pip in the venv; the whole output goes to the log, the
# console shows it through scripts/setup_progress.py (--build: pip -v of a source build,
# shown as compile progress).
vpip() {
    local label=$1 mode=()
    shift
    if [ "${1:-}" = --build ]; then
        shift
        mode=(--build)
        set -- -v "$@"
    fi
    log "pip $*"
    "$VPY" -m pip "$@" 2>&1 | tee -a "$LOG" | "$PYTHON" "$ROOT/scripts/setup_progress.py" --label "$label" "${mode[@]}"
    return "${PIPESTATUS[0]}"
}

# Nothing is set up until the end says so.
rm -f "$FULL_STAMP" "$CORE_STAMP"
log "setting up $VENV ($PROFILE profile); log: $LOG"

# ---------------------------------------------------------------- 1. venv
step 1 "virtual environment"
if [ ! -x "$VPY" ]; then
    command -v "$PYTHON" >/dev/null || fail "base interpreter '$PYTHON' not found (set PYTHON=...)"
    if torch_ok "$PYTHON"; then
        log "$PYTHON already has a working torch+torchvision; venv with --system-site-packages"
        venv_args=(--system-site-packages)
    else
        log "creating $VENV from $PYTHON"
        venv_args=()
    fi
    if ! "$PYTHON" -m venv "${venv_args[@]}" "$VENV" >> "$LOG" 2>&1; then
        rm -rf "$VENV"  # created by this run: never left half-made
        fail "'$PYTHON -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)"
    fi
fi
"$VPY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' >> "$LOG" 2>&1 \
    || fail "$VPY is older than Python 3.10 (set PYTHON=python3.11 and delete $VENV)"
"$VPY" -m pip --version >> "$LOG" 2>&1 \
    || fail "the venv $VENV has no working pip: delete it (make clean-venv) and rerun"
# As an activated venv: the builds below find the venv's ninja (torch's extension builder
# looks for `ninja` on PATH; without it, it compiles one file at a time and MAX_JOBS is unused).
export PATH="$VENV/bin:$PATH"

# ---------------------------------------------------------------- 2. torch
step 2 "torch $TORCH_VERSION + torchvision $TORCHVISION_VERSION"
if torch_ok "$VPY"; then
    log "torch/torchvision OK: $("$VPY" -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)')"
else
    # A torch that imports but whose torchvision ops fail (e.g. a local CPU torch
    # wheel next to PyPI's CUDA torchvision) is removed first; pip would otherwise
    # consider torch==X satisfied by X+cpu.
    if "$VPY" -c 'import sys, torch; sys.exit(0 if torch.__file__.startswith(sys.prefix) else 1)' >/dev/null 2>&1; then
        log "the venv has an unusable torch/torchvision pair; removing it"
        vpip torch uninstall -y torch torchvision || fail "pip could not remove the unusable torch"
    fi
    # --isolated: ignore pip config files and PIP_* variables for THIS step, so a
    # machine-wide find-links to a local CPU-only torch wheel (whose ABI does not
    # match PyPI's torchvision) is not used.  PIP_CERT, PIP_DEFAULT_TIMEOUT,
    # PIP_CACHE_DIR and PIP_INDEX_URL (or TORCH_INDEX_URL) are passed on.
    torch_args=(--isolated)
    [ -n "${PIP_CERT:-}" ] && torch_args+=(--cert "$PIP_CERT")
    [ -n "${PIP_DEFAULT_TIMEOUT:-}" ] && torch_args+=(--timeout "$PIP_DEFAULT_TIMEOUT")
    [ -n "${PIP_CACHE_DIR:-}" ] && torch_args+=(--cache-dir "$PIP_CACHE_DIR")
    if [ -n "${TORCH_INDEX_URL:-${PIP_INDEX_URL:-}}" ]; then
        torch_args+=(--index-url "${TORCH_INDEX_URL:-$PIP_INDEX_URL}")
    fi
    log "downloading torch: ~4 GB with its CUDA libraries, about 3.5 min measured on this project's machines"
    vpip torch install "${torch_args[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
        || fail "pip could not install torch $TORCH_VERSION / torchvision $TORCHVISION_VERSION"
    torch_ok "$VPY" || fail "torch $TORCH_VERSION / torchvision $TORCHVISION_VERSION installed but torchvision.ops.nms fails"
fi

# ---------------------------------------------------------------- 3. build tools
# setuptools 80.9 (the pin) keeps pkg_resources (mmcv's setup.py, detectron2 v0.6)
# and satisfies torch's setuptools>=77.
step 3 "build tools"
vpip tools install -c "$CONSTRAINTS" setuptools wheel ninja || fail "pip could not install setuptools, wheel, ninja"

# ---------------------------------------------------------------- 4. mmcv
mmcv_wheel_at_hand() {  # a built mmcv wheel in pip's cache or a find-links folder: no compiling
    "$VPY" -m pip cache list "mmcv-$MMCV_PIN-*" 2>/dev/null | grep -q '\.whl' && return 0
    local dir
    for dir in ${PIP_FIND_LINKS:-}; do
        compgen -G "${dir#file://}/mmcv-$MMCV_PIN-*.whl" >/dev/null && return 0
    done
    return 1
}
if [ "$PROFILE" = full ]; then
    step 4 "mmcv $MMCV_PIN"
    if ! "$VPY" -c "import mmcv, mmcv._ext, sys; sys.exit(mmcv.__version__ != '$MMCV_PIN')" >/dev/null 2>&1 \
        && ! mmcv_wheel_at_hand; then
        log "mmcv $MMCV_PIN is compiled from source now (MAX_JOBS=$MAX_JOBS): 15-20 min on an idle 2-core machine,"
        log "over an hour on a busy one (measured); pip caches the result, so only a machine's first set-up pays it."
        log "Only need the torch-level layers? Ctrl-C and run \`make test-core\`: the torch-only tests, no toolkits."
        if [ -n "${CXX:-}" ]; then
            command -v "${CXX%% *}" >/dev/null || fail "no C++ compiler: CXX=$CXX is not found"
        else
            command -v c++ >/dev/null || command -v g++ >/dev/null || fail "no C++ compiler: neither c++ nor g++ is on PATH"
        fi
        "$VPY" -c 'import os, sysconfig; assert os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' \
            >/dev/null 2>&1 || fail "Python.h: No such file (the Python development headers are missing)"
    fi
    # Always asked for: a no-op (seconds) when the pinned mmcv is installed; otherwise
    # pip builds it from source, or takes a wheel it built earlier from its cache.
    vpip mmcv --build install --no-build-isolation -c "$CONSTRAINTS" mmcv || fail "pip could not install mmcv $MMCV_PIN"
    if ! "$VPY" -c 'import torch, mmcv, mmcv._ext' >> "$LOG" 2>&1; then
        vpip mmcv uninstall -y mmcv || true
        fail "mmcv was installed without its compiled ops (mmcv._ext); it is uninstalled again. If pip took a bad cached wheel, \`$VPY -m pip cache remove mmcv\` before rerunning"
    fi
    log "mmcv $("$VPY" -c 'import mmcv; print(mmcv.__version__)') with its compiled ops"
fi

# ---------------------------------------------------------------- 5. the project
# --no-build-isolation: setup.py compiles the C++ extension against this venv's torch.
step $([ "$PROFILE" = full ] && echo 5 || echo 4) "sn_plugin (editable, extras: $EXTRAS)"
vpip sn_plugin --build install --no-build-isolation -c "$CONSTRAINTS" -e ".[$EXTRAS]" \
    || fail "pip could not install sn_plugin and its pinned dependencies"

# ---------------------------------------------------------------- 6. detectron2
if [ "$PROFILE" = full ]; then
    step 6 "detectron2"
    if [ "${SN_SKIP_DETECTRON2:-0}" = 1 ]; then
        log "skipped (SN_SKIP_DETECTRON2=1)"
    else
        if ! SN_CONSTRAINTS="$CONSTRAINTS" "$VPY" "$ROOT/scripts/install_detectron2.py" 2>&1 | tee -a "$LOG" \
            | "$PYTHON" "$ROOT/scripts/setup_progress.py" --label detectron2; then
            fail "scripts/install_detectron2.py failed"
        fi
    fi
fi

# ---------------------------------------------------------------- 7. check + stamp
step "$STEPS" "import check"
"$VPY" -m pip check 2>&1 | tee -a "$LOG" | sed 's/^/[pip check] /' || log "pip check reported problems (see above)"
import_check "$PROFILE" >> "$LOG" 2>&1 || fail "the installed packages do not import"
stamp_value "$PROFILE" "$EXTRAS" > "$STAMP"
log "done in $(elapsed): $VENV ($("$VPY" -c 'import torch; print("torch", torch.__version__)'), $PROFILE profile)"
