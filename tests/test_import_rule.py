"""The web container's cold start: importing the API loads none of torch, av, numpy."""

import subprocess
import sys

HEAVY = ("torch", "av", "numpy", "PIL")


def test_web_app_imports_no_heavy_modules():
    code = (
        "import sys, functions.app, lib.local.server\n"
        "functions.app.create_app()\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported by the web app: {out.stdout.strip()}"
