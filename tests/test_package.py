"""The package imports from a source checkout that was never installed (no package-dir mapping)."""

import shutil
import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_source_checkout_imports_kernels_without_install(tmp_path):
    for name in ("lowrank", "kernels"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    # -S skips site-packages' .pth files, so the editable install's finder cannot supply lowrank.kernels.
    paths = [str(tmp_path)] + site.getsitepackages()
    code = (f"import sys; sys.path[:0] = {paths!r}; import lowrank, lowrank.kernels.lora as k; "
            "print(lowrank.__file__); print(k.__file__)")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[0] == str(tmp_path / "lowrank" / "__init__.py")
    assert lines[1] == str(tmp_path / "kernels" / "lora.py")
