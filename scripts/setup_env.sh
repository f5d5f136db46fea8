#!/usr/bin/env bash
# Create / refresh the project's virtual environment in .venv/ (idempotent).
#
#   bash scripts/setup_env.sh          # or: make setup
#
# Steps (each skipped when already satisfied):
#   1. .venv/ from ${PYTHON:-python3}; with --system-site-packages when that
#      interpreter already has a working torch + torchvision (e.g. your CUDA build).
#   2. torch/torchvision (TORCH_VERSION / TORCHVISION_VERSION) unless the venv
#      already imports a working pair (torchvision.ops.nms runs).
#   3. build tools, then mmcv from source (--no-build-isolation, MAX_JOBS jobs;
#      ~15-20 min on 2 cores the first time, seconds later: pip caches the wheel).
#   4. pip install -e ".[all]" under requirements/constraints.txt (exact pins).
#   5. detectron2: kept if importable, else its v0.6 Python package without the
#      compiled extension (scripts/install_detectron2.py).
#   6. import check; a stamp file makes the next run return in seconds.
#
# Environment knobs:
#   PYTHON              base interpreter (default python3)
#   SN_VENV             venv path (default <repo>/.venv)
#   SN_EXTRAS           extras of sn_plugin to install (default all)
#   TORCH_VERSION       default 2.13.0;  TORCHVISION_VERSION default 0.28.0
#   TORCH_INDEX_URL     e.g. https://download.pytorch.org/whl/cu121 (optional)
#   MAX_JOBS            parallel compile jobs for mmcv (default: nproc, max 8)
#   SN_FORCE=1          ignore the stamp and re-run every step
#   SN_SKIP_DETECTRON2=1  do not install detectron2
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="${SN_VENV:-$ROOT/.venv}"
VPY="$VENV/bin/python"
CONSTRAINTS="$ROOT/requirements/constraints.txt"
EXTRAS="${SN_EXTRAS:-all}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.28.0}"
STAMP="$VENV/.sn_setup_stamp"
T0=$SECONDS

log() { printf '[setup_env %4ss] %s\n' "$((SECONDS - T0))" "$*"; }
die() { printf '[setup_env] ERROR: %s\n' "$*" >&2; exit 1; }

if [ -z "${MAX_JOBS:-}" ]; then
    MAX_JOBS="$(nproc 2>/dev/null || echo 2)"
    [ "$MAX_JOBS" -gt 8 ] && MAX_JOBS=8
fi
export MAX_JOBS

# Machines of this project's own CI keep a prebuilt mmcv wheel beside the clone
# (../shared/wheels); pip takes it instead of the source build. A user's machine
# has no such folder and builds mmcv from source.
SHARED_WHEELS="$(cd "$ROOT/.." && pwd)/shared/wheels"
if [ -d "$SHARED_WHEELS" ]; then
    export PIP_FIND_LINKS="${PIP_FIND_LINKS:+$PIP_FIND_LINKS }$SHARED_WHEELS"
fi

# Quiet the "Location ... is ignored" noise of file:// extra indexes, keep errors.
pip_filter() { grep -v -E "^WARNING: Location '.*' is ignored|^\[notice\]" || true; }
vpip() {
    log "pip $*"
    "$VPY" -m pip "$@" 2>&1 | pip_filter
    return "${PIPESTATUS[0]}"
}

# Does interpreter $1 import torch + torchvision with working C++ ops?
torch_ok() {
    "$1" - <<'EOF' >/dev/null 2>&1
import torch, torchvision
b = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.], [50., 50., 60., 60.]])
keep = torchvision.ops.nms(b, torch.tensor([0.9, 0.8, 0.7]), 0.5)
assert keep.tolist() == [0, 2], keep
EOF
}

stamp_value() {
    {
        cat "$CONSTRAINTS" "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" \
            "$ROOT/scripts/install_detectron2.py"
        echo "$EXTRAS ${SN_SKIP_DETECTRON2:-0} $TORCH_VERSION $TORCHVISION_VERSION"
    } | sha256sum | cut -d' ' -f1
}

IMPORT_CHECK='
import importlib, importlib.util, sys
mods = ["torch", "torchvision", "mmengine", "mmcv", "mmcv._ext", "mmdet", "mmseg",
        "mmpretrain", "mmaction", "pycocotools"]
if "--d2" in sys.argv:
    mods.append("detectron2")
for m in mods:
    importlib.import_module(m)
# the project itself: installed (editable), not imported, so that set-up does
# not depend on the state of the package code
assert importlib.util.find_spec("sn_plugin") is not None, "sn_plugin is not installed"
'

d2_flag() { [ "${SN_SKIP_DETECTRON2:-0}" = 1 ] || echo --d2; }

# ---------------------------------------------------------------- fast path
if [ "${SN_FORCE:-0}" != 1 ] && [ -x "$VPY" ] && [ -f "$STAMP" ] \
    && [ "$(cat "$STAMP")" = "$(stamp_value)" ] \
    && torch_ok "$VPY" && "$VPY" -c "$IMPORT_CHECK" $(d2_flag) >/dev/null 2>&1; then
    log "environment in $VENV is up to date (SN_FORCE=1 to redo)"
    exit 0
fi

# ---------------------------------------------------------------- 1. venv
if [ ! -x "$VPY" ]; then
    command -v "$PYTHON" >/dev/null || die "base interpreter '$PYTHON' not found (set PYTHON=...)"
    if torch_ok "$PYTHON"; then
        log "$PYTHON already has a working torch+torchvision; venv with --system-site-packages"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        log "creating $VENV from $PYTHON"
        "$PYTHON" -m venv "$VENV"
    fi
fi
"$VPY" -c 'import sys; assert sys.version_info >= (3, 8), sys.version' \
    || die "Python >= 3.8 needed"

# ---------------------------------------------------------------- 2. torch
if torch_ok "$VPY"; then
    log "torch/torchvision OK: $("$VPY" -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)')"
else
    # A torch that imports but whose torchvision ops fail (e.g. a local CPU torch
    # wheel next to PyPI's CUDA torchvision) is removed first; pip would otherwise
    # consider torch==X satisfied by X+cpu.
    if "$VPY" -c 'import torch' >/dev/null 2>&1 \
        && "$VPY" -c 'import sys, torch; sys.exit(0 if torch.__file__.startswith(sys.prefix) else 1)' >/dev/null 2>&1; then
        log "venv has an unusable torch/torchvision pair; removing it"
        vpip uninstall -y torch torchvision
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
    vpip install "${torch_args[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
    torch_ok "$VPY" || die "torch $TORCH_VERSION / torchvision $TORCHVISION_VERSION installed but torchvision.ops.nms fails"
fi

# ---------------------------------------------------------------- 3. build tools + mmcv
# setuptools: <70 per mmcv's docs is not needed; 80.9 keeps pkg_resources (mmcv's
# setup.py, detectron2 v0.6) and satisfies torch>=2.6's setuptools>=77 requirement.
vpip install -c "$CONSTRAINTS" setuptools wheel ninja
# Always asked for: a no-op (seconds) when the pinned mmcv is installed; otherwise
# pip builds it from source, or takes the wheel it built earlier from its cache.
log "mmcv: source build with MAX_JOBS=$MAX_JOBS the first time (~15-20 min on 2 cores), cached afterwards"
vpip install --no-build-isolation -c "$CONSTRAINTS" mmcv
"$VPY" -c 'import torch, mmcv, mmcv._ext' || die "mmcv is installed without its compiled ops (mmcv._ext)"

# ---------------------------------------------------------------- 4. project + pinned deps
vpip install -c "$CONSTRAINTS" -e ".[$EXTRAS]"

# ---------------------------------------------------------------- 5. detectron2
if [ "${SN_SKIP_DETECTRON2:-0}" != 1 ]; then
    SN_CONSTRAINTS="$CONSTRAINTS" "$VPY" "$ROOT/scripts/install_detectron2.py" 2>&1 | pip_filter
    [ "${PIPESTATUS[0]}" = 0 ] || die "detectron2 install failed"
fi

# ---------------------------------------------------------------- 6. check + stamp
"$VPY" -m pip check 2>&1 | sed 's/^/[pip check] /' || log "pip check reported problems (see above)"
"$VPY" -c "$IMPORT_CHECK" $(d2_flag) || die "import check failed"
stamp_value > "$STAMP"
log "done: $VENV ($("$VPY" -c 'import torch, mmcv; print("torch", torch.__version__, "mmcv", mmcv.__version__)'))"
