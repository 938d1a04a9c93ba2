#!/usr/bin/env python3
"""SASS checks of the compiled CUDA kernels (no GPU needed): 128-bit loads in the hot kernels, no spills.

    python .ci/check_sass.py OBJ.o [OBJ.o ...]

Disassembles each object with `cuobjdump -sass` (CUOBJDUMP, PATH, /usr/local/cuda/bin, or the copy bundled with
triton) and, per kernel and architecture:
  - every kernel: no local-memory accesses (LDL/STL: register spills or stack arrays);
  - hot kernels on their vector path (template VEC > 1: targets_rows_reg_kernel, targets_rows_global_kernel,
    instance_stats_kernel, regression_loss_kernel; and ema_kernel): at least one 128-bit global load LDG.E.128
    (a generic LD.E.128 does not count: it goes through address translation).
Prints one line per kernel; exits 1 on a violation, 0 otherwise, 2 when cuobjdump is missing.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

HOT = ("targets_rows_reg_kernel", "targets_rows_global_kernel", "instance_stats_kernel", "regression_loss_kernel")
ALWAYS_VECTOR = ("ema_kernel",)


def find_cuobjdump() -> str | None:
    candidates = [os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except Exception:
        pass
    return next((p for p in candidates if p and os.path.isfile(p) and os.access(p, os.X_OK)), None)


def kernels(sass: str):
    """(arch, mangled name, body) of every function in a cuobjdump -sass listing."""
    arch = "?"
    for block in re.split(r"\n(?=\s*(?:arch = |Function : ))", sass):
        m = re.match(r"\s*arch = (\w+)", block)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function : (\S+)", block)
        if m:
            yield arch, m.group(1), block


def short_name(mangled: str) -> str:
    for name in HOT + ALWAYS_VECTOR + ("count_mask_kernel",):
        i = mangled.find(name)
        if i >= 0:
            return name + mangled[i + len(name):]
    return mangled


def vector_width(name: str) -> int:
    """The kernel's VEC template argument: the first integer template argument (Li<n>E) in its mangled name."""
    m = re.search(r"Li(\d+)E", name)
    return int(m.group(1)) if m else 1


def check(objects: list[str]) -> int:
    tool = find_cuobjdump()
    if tool is None:
        print("check_sass: cuobjdump not found (set CUOBJDUMP)", file=sys.stderr)
        return 2
    failures = 0
    for obj in objects:
        res = subprocess.run([tool, "-sass", obj], capture_output=True, text=True)
        if res.returncode != 0:
            print(f"check_sass: cuobjdump failed on {obj}: {res.stderr.strip()}", file=sys.stderr)
            return 1
        found = 0
        for arch, mangled, body in kernels(res.stdout):
            found += 1
            name = short_name(mangled)
            ldg128 = len(re.findall(r"\bLDG\.E\.128\b", body))
            stg128 = len(re.findall(r"\bSTG\.E\.128\b", body))
            local = len(re.findall(r"\b(?:LDL|STL)(?:\.\w+)*\b", body))
            problems = []
            if local:
                problems.append(f"{local} local-memory accesses (spills)")
            wants_vector = name.startswith(ALWAYS_VECTOR) or (name.startswith(HOT) and vector_width(name) > 1)
            if wants_vector and ldg128 == 0:
                problems.append("no LDG.E.128 on its vector path")
            status = "FAIL " + "; ".join(problems) if problems else "ok"
            print(f"  {arch:6s} {os.path.basename(obj):22s} {name[:72]:72s} LDG.128={ldg128:<3d} STG.128={stg128:<3d} "
                  f"local={local:<3d} {status}")
            failures += bool(problems)
        if found == 0:
            print(f"check_sass: no kernels found in {obj}", file=sys.stderr)
            failures += 1
    print(f"check_sass: {'OK' if failures == 0 else f'{failures} kernel(s) failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(check(sys.argv[1:]))
