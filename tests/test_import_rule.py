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


def test_cpu_pool_jobs_import_no_torch():
    """上传检查与外部提供方任务（CPU 池，镜像里没有 torch）：runner 与它们的处理器都不导入 torch；GPU 处理器照旧导入"""
    code = (
        "import sys\n"
        "from gpu_jobs.runner import load_handler\n"
        "load_handler('gpu_jobs.handlers.media_probe:run'), load_handler('gpu_jobs.handlers.kling:run')\n"
        "print('torch' in sys.modules)\n"
        "load_handler('gpu_jobs.handlers.image_upscale:run')\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
