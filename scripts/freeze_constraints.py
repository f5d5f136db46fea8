#!/usr/bin/env python
"""Print requirements/constraints.txt from the working environment (make constraints).

Exact pins of everything `pip freeze --local` reports, except:
  * torch, torchvision and what only torch pins for itself (nvidia-*, cuda-*,
    triton, sympy, mpmath): a user's own torch build (venv with
    --system-site-packages) must not conflict with the constraints;
  * the project itself and detectron2 (installed by scripts/install_detectron2.py,
    not from an index).
"""
import re
import subprocess
import sys

EXCLUDE = re.compile(
    r"^(torch|torchvision|torchaudio|triton|sympy|mpmath|nvidia-.*|cuda-.*|"
    r"sn[-_]plugin|detectron2|pip)$",
    re.I,
)

HEADER = """\
# Exact versions installed by scripts/setup_env.sh (pip install -c this file).
# Generated with `make constraints` (scripts/freeze_constraints.py) from an
# environment where the whole stack and the test suite worked:
#   Python 3.11, torch 2.13.0 + torchvision 0.28.0 (installed separately, not pinned here),
#   mmcv 2.1.0 built from source (setuptools 80.9: keeps pkg_resources, satisfies torch's >=77).
# torch/torchvision and their nvidia/cuda/triton/sympy deps are deliberately absent.
"""


def main():
    out = subprocess.check_output(
        [sys.executable, "-m", "pip", "freeze", "--local", "--all", "--exclude-editable"],
        text=True,
    )
    pins = []
    for line in out.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "==" not in line:
            continue  # editable / direct-URL entries
        name, version = line.split("==", 1)
        if EXCLUDE.match(name) or "+" in version:
            continue
        pins.append("%s==%s" % (name, version))
    pins.sort(key=str.lower)
    sys.stdout.write(HEADER + "\n".join(pins) + "\n")


if __name__ == "__main__":
    main()
