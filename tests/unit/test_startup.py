"""Start-up stays light (style.md §5) and the file stays Python 3.9 compatible.

Timings live in tests/bench/bench_startup.py; here we only prove, as six's test_lazy
does, that importing fencevirt pulls in none of the heavy modules.
"""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAVY = ("subprocess", "xml.etree.ElementTree", "libvirt", "logging.handlers", "json",
         "ctypes", "argparse", "dataclasses", "typing", "ipaddress", "secrets", "random",
         "termios")


def _loaded_after(code):
    probe = (f"import sys; sys.path.insert(0, {ROOT!r}); {code}; "
             f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_import_is_lazy():
    assert _loaded_after("import fencevirt") == []


@pytest.mark.parametrize("argv", [["fence_xvm", "-o", "metadata"],
                                  ["fence_virt", "-o", "metadata"]])
def test_metadata_run_is_lazy(argv):
    """What Pacemaker runs at every device registration imports nothing heavy."""
    code = (f"import io, fencevirt; out = sys.stdout; sys.stdout = io.StringIO(); "
            f"rc = fencevirt.main({argv!r}); sys.stdout = out; assert rc == 0")
    assert _loaded_after(code) == []


def test_vermin_python_3_9():
    vermin = shutil.which("vermin") or os.path.join(os.path.dirname(sys.executable), "vermin")
    if not os.access(vermin, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail("CI: vermin missing (tests/run-all.sh pip-installs it)")
        pytest.skip("vermin missing (tests/run-all.sh pip-installs it)")
    r = subprocess.run([vermin, "-t=3.9-", "--no-tips", "--violations", "--eval-annotations",
                        os.path.join(ROOT, "fencevirt.py")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
