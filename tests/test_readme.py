"""README.md against the code: the settings table, .env.example, the endpoint table and the models' examples."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import pytest
from dotenv import dotenv_values

from lib.catalog import CATALOG, validate_params
from lib.config import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PROCESS_ENV_ONLY = {"SPOOL_DEVICE"}  # read by the media jobs from the process environment, not a Settings field


def section(title: str) -> str:
    """一个二级标题下的内容（到下一个二级标题为止）"""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def table_rows(text: str, header: str) -> list[list[str]]:
    """表头之后的各行（按 | 分列；单元格里的 \\| 不分列）"""
    lines = text[text.index(header) :].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


def test_settings_table_names_every_setting_with_its_default():
    documented: dict[str, str] = {}
    for name_cell, default_cell, _ in table_rows(section("Settings"), "| name | default | meaning |"):
        names = ticked(name_cell)
        values = ticked(default_cell)
        for i, name in enumerate(names):
            documented[name] = values[i] if len(values) == len(names) else default_cell
    fields = {name.upper() for name in Settings.model_fields}
    assert set(documented) - PROCESS_ENV_ONLY == fields
    for name, shown in documented.items():
        if name in PROCESS_ENV_ONLY:
            continue
        default = Settings.model_fields[name.lower()].default
        if default is None:
            assert shown == "–" or shown.startswith("local:"), name
        elif isinstance(default, list):
            assert shown == ",".join(default), name
        elif isinstance(default, int) and shown.endswith(("MiB", "GiB")):
            amount, unit = shown.split()
            assert int(amount) * 1024 ** {"MiB": 2, "GiB": 3}[unit] == default, name
        elif isinstance(default, int | float) and re.fullmatch(r"[\d,]+(\s.*)?", shown):
            number = shown.split()[0].replace(",", "")  # `600`, 40,000,000, 33,177,600 (8K)
            assert float(number) == default, name
        elif not shown.endswith("…"):
            assert shown == str(default), name


def test_env_example_holds_every_setting_at_its_default():
    text = (ROOT / ".env.example").read_text()
    named = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, flags=re.M))
    assert named == {name.upper() for name in Settings.model_fields}
    values = {k.lower(): v for k, v in dotenv_values(ROOT / ".env.example").items()}
    example = Settings(_env_file=None, **values)  # arguments win over the environment
    for name in values:
        default = Settings.model_fields[name].default
        if name == "spool_home":
            default = default.resolve()
        assert getattr(example, name) == default, name


def app_routes() -> set[tuple[str, str]]:
    from functions.app import ROUTERS
    from lib.local import dev_auth

    routes = set()
    for router in [module.router for module in ROUTERS] + [dev_auth.router]:
        for route in router.routes:
            if router is dev_auth.router and not route.include_in_schema:
                continue  # the local JWKS: Supabase's path, not this API's
            status = route.status_code or 200
            routes |= {(method, re.sub(r"\{\w+\}", "{}", route.path), status) for method in route.methods}
    return routes


def test_endpoint_table_lists_every_route():
    documented = set()
    for endpoint, _, answers in table_rows(README, "| endpoint | what | answers |"):
        method, path = ticked(endpoint)[0].split()
        documented.add((method, re.sub(r"\{\w+\}", "{}", path), int(answers.split()[0])))
    assert documented == app_routes()


def test_endpoint_table_names_every_field_of_the_upload_ticket():
    from functions.assets import AssetUploadTicket

    row = next(r for r in table_rows(README, "| endpoint | what | answers |") if r[0] == "`POST /assets/uploads`")
    answer = re.search(r"→ `\{([^}]*)\}`", row[1]).group(1)
    assert [name.strip() for name in answer.split(",")] == list(AssetUploadTicket.model_fields)


def test_models_table_names_each_model_and_its_params():
    rows = table_rows(section("Models and prices"), "| model_key | params | output | price (credits) |")
    keys = set()
    for key_cell, params_cell, *_ in rows:
        row_keys = ticked(key_cell)
        keys |= set(row_keys)
        if not row_keys[0].startswith("kling."):
            assert set(ticked(params_cell)) == set(CATALOG[row_keys[0]].params.model_fields), row_keys
    assert keys == set(CATALOG)


EXAMPLE_ID = "3f0c1e0e-2d7b-4d0e-9a49-6b1f4f0a6c11"


def example_bodies() -> list[dict]:
    bodies = []
    for line in README.splitlines():
        line = line.strip()
        if line.startswith('{"model_key"'):
            bodies.append(json.loads(line.replace("<uuid>", EXAMPLE_ID)))
    for body in re.findall(r"-d '(\{\"model_key\".*?\})'", README, flags=re.S):
        bodies.append(json.loads(body))
    for body in re.findall(r'-d "(\{\\"model_key\\".*?\})"', README, flags=re.S):
        bodies.append(json.loads(body.replace('\\"', '"').replace("$ASSET", EXAMPLE_ID)))
    return bodies


def test_readme_has_task_examples_for_every_public_model():
    keys = {body["model_key"] for body in example_bodies()}
    assert keys == {key for key, spec in CATALOG.items() if spec.public}


@pytest.mark.parametrize("body", example_bodies(), ids=lambda body: body["model_key"])
def test_readme_task_example_is_accepted(body):
    validate_params(CATALOG[body["model_key"]], body["params"])


def answer_fields(route) -> list[str]:
    """路由回答里 data 的字段（列表取其中一项的字段）"""
    data = route.response_model.model_fields["data"].annotation
    if "items" in getattr(data, "model_fields", {}):
        data = typing.get_args(data.model_fields["items"].annotation)[0]
    return list(data.model_fields)


def documented_answers() -> list[tuple[str, str, list[str]]]:
    """端点表里写明的回答字段：`→ {…}` 之后的，或没有请求体时那一格里的 {…}"""
    answers = []
    for endpoint, what, _ in table_rows(README, "| endpoint | what | answers |"):
        method, path = ticked(endpoint)[0].split()
        shown = what.split("→", 1)[1] if "→" in what else what
        fields = re.findall(r"`\{([^}]*)\}`", shown)
        if fields:
            answers.append((method, path, [name.strip() for name in fields[0].split(",")]))
    return answers


@pytest.mark.parametrize("method,path,fields", documented_answers(), ids=lambda v: v if isinstance(v, str) else "")
def test_endpoint_table_names_every_field_of_the_answer(method, path, fields):
    from functions.app import ROUTERS
    from lib.local import dev_auth

    shape = re.sub(r"\{\w+\}", "{}", path)
    routes = [r for m in [*ROUTERS, dev_auth] for r in m.router.routes if method in getattr(r, "methods", ())]
    route = next(r for r in routes if re.sub(r"\{\w+\}", "{}", r.path) == shape)
    assert fields == answer_fields(route)


def test_kling_deadline_bound_and_job_limit_are_the_codes():
    from lib.catalog import KLING_TIMEOUT_S

    bound = next(m.le for m in Settings.model_fields["kling_poll_deadline_seconds"].metadata if hasattr(m, "le"))
    row = next(r for r in table_rows(section("Settings"), "| name | default | meaning |") if "KLING_POLL" in r[0])
    example = next(line for line in (ROOT / ".env.example").read_text().splitlines() if "DEADLINE" in line)
    for text in (row[2], example):
        assert f"at most {bound:.0f}" in text and f"{KLING_TIMEOUT_S // 60} min" in text, text


def test_kling_price_table_is_the_catalogs():
    from lib.catalog import KLING_MASTER_PRICES, KLING_PRICES

    rows = table_rows(section("Kling AI (external provider)"), "| model | 5 s | 10 s |")
    shown = {ticked(row[0])[0]: [int(cell.split()[0]) for cell in row[1:]] for row in rows}
    expected = {mode: [KLING_PRICES[(mode, "5")], KLING_PRICES[(mode, "10")]] for mode in ("std", "pro")}
    assert shown == {**expected, "-master": [KLING_MASTER_PRICES["5"], KLING_MASTER_PRICES["10"]]}


def test_every_benchmark_is_named_where_the_readme_runs_and_reports_it():
    scripts = {path.name for path in (ROOT / "bench").glob("*.py")}
    reported = set(re.findall(r"^### .*\(`bench/(\w+\.py)`\)$", section("Performance"), flags=re.M))
    assert reported == scripts
    makefile = (ROOT / "Makefile").read_text()
    run_by_make = set(re.findall(r"bench/(\w+\.py)", makefile[makefile.index("\nbench:") :].split("\n\n")[0]))
    line = next(line for line in section("Development").splitlines() if line.startswith("make bench"))
    others = set(re.findall(r"(\w+\.py)", line.split("others", 1)[1]))
    assert run_by_make | others == scripts and not run_by_make & others, line


def test_deploy_scaling_figures_are_the_apps():
    import modal_app

    scaling = next(p for p in section("Deploy (Supabase + Modal + Stripe)").split("\n- ") if p.startswith("**Scaling"))
    scaling = " ".join(scaling.split())
    api = modal_app.api.info().concurrency_info
    assert f"container serves {api.max_inputs} requests at once" in scaling
    assert f"`DB_POOL_MAX` ({Settings.model_fields['db_pool_max'].default})" in scaling
    assert f"`API_MAX_CONTAINERS` ({modal_app.API_MAX_CONTAINERS})" in scaling
    caps = re.search(r"job functions at (.*?) \(`MAX_CONTAINERS`\)", scaling).group(1)
    pools = {"upload-check": "probe"}  # the prose names a pool by what it runs
    shown = {pools.get(name, name): int(n) for n, name in re.findall(r"(\d+) `?([\w-]+)`?", caps)}
    assert shown == modal_app.MAX_CONTAINERS, caps


def test_deploy_time_limits_in_prose_are_the_codes():
    import modal_app
    from lib.catalog import IO_ALLOWANCE_S, KLING_TIMEOUT_S
    from lib.reaper import leftover_grace_seconds

    deploy = " ".join(section("Deploy (Supabase + Modal + Stripe)").split())
    assert f"{IO_ALLOWANCE_S // 60} more minutes (`IO_ALLOWANCE_S`)" in deploy
    assert f"longest model's `timeout_s` plus {modal_app.IO_MARGIN_S // 60} minutes" in deploy
    assert f"a Kling job takes up to {KLING_TIMEOUT_S // 60} minutes" in deploy
    retired = modal_app.run_cpu.info().timeout + Settings.model_fields["task_queue_timeout_seconds"].default
    assert f"a deploy {round(retired / 3600)} hours later (`TASK_QUEUE_TIMEOUT_SECONDS` and its longest job)" in deploy
    lifecycle = " ".join(section("How a task runs").split())
    assert f"plus {modal_app.IO_MARGIN_S // 60} minutes: {leftover_grace_seconds() // 60} min)" in lifecycle
