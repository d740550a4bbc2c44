"""Cold start: a fresh process imports the API and answers its first /health, against a bare FastAPI app.

Run: .venv/bin/python bench/cold_start.py [--runs 7]
Starts the embedded Postgres (SPOOL_HOME, default .spool) so /health really queries the database.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Each snippet prints the seconds from its first line to the first response.
FIRST_RESPONSE = """
import time; t0 = time.perf_counter()
{imports}
import asyncio, httpx
async def main():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://b") as c:
        r = await c.get("/health")
        assert r.status_code == 200, r.text
asyncio.run(main())
print(time.perf_counter() - t0)
"""
BARE = """
from fastapi import FastAPI
app = FastAPI()
@app.get("/health")
async def health():
    return {"status": "ok"}
"""
SPOOL = """
from functions.app import create_app
app = create_app()
"""
# What Modal's web container does: import the app module (Modal + the catalog), then call `api()`.
MODAL = """
import modal_app
app = modal_app.api.local()
"""


def measure(imports: str, runs: int) -> tuple[float, float]:
    """返回 (进程内首个响应耗时, 含解释器启动的总耗时) 的中位数"""
    inner, outer = [], []
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", FIRST_RESPONSE.format(imports=imports)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=os.environ.copy(),
        )
        outer.append(time.perf_counter() - start)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-2000:])
        inner.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(inner), statistics.median(outer)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    os.chdir(ROOT)
    from lib.local import stack

    cases = [("bare FastAPI, one route", BARE), ("Spool API (functions.app)", SPOOL)]
    if (ROOT / "modal_app.py").exists():
        cases.append(("modal_app.api (Modal web container)", MODAL))
    with stack.prepared():
        results = {name: measure(code, args.runs) for name, code in cases}
    _, base_outer = results["bare FastAPI, one route"]
    print(f"cold start, median of {args.runs} fresh processes ({os.cpu_count()} CPUs)")
    print(f"{'app':<42}{'import+first /health':>22}{'whole process':>16}{'ratio':>8}")
    for name, (inner, outer) in results.items():
        print(f"{name:<42}{inner * 1000:>19.0f} ms{outer * 1000:>13.0f} ms{outer / base_outer:>7.2f}x")


if __name__ == "__main__":
    main()
