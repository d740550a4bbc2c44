"""Projects: CRUD through the API, paging, and other users' projects are invisible (RLS)."""

from __future__ import annotations

import uuid

import pytest

from lib import db
from lib.assets import ASSET_PAGE
from lib.errors import NotFound
from lib.projects import get_project_service
from lib.tasks import TASK_PAGE
from tests.factories import connect, make_asset, plan_as, sql


async def test_create_read_update_delete(client, make_user):
    user = await make_user()
    resp = await client.post("/projects", json={"name": "  Trailer  ", "description": "cuts"}, headers=user.headers)
    assert resp.status_code == 201, resp.text
    project = resp.json()["data"]
    assert project["name"] == "Trailer" and project["description"] == "cuts"
    assert set(project) == {"id", "name", "description", "created_at", "updated_at"}

    got = (await client.get(f"/projects/{project['id']}", headers=user.headers)).json()["data"]
    assert got == project

    resp = await client.patch(f"/projects/{project['id']}", json={"description": None}, headers=user.headers)
    patched = resp.json()["data"]
    assert patched["name"] == "Trailer" and patched["description"] is None
    assert patched["updated_at"] >= project["updated_at"]
    resp = await client.patch(f"/projects/{project['id']}", json={"name": "Teaser"}, headers=user.headers)
    assert resp.json()["data"]["name"] == "Teaser"

    resp = await client.delete(f"/projects/{project['id']}", headers=user.headers)
    assert resp.json() == {"success": True, "data": {"id": project["id"], "deleted": True}}
    assert (await client.get(f"/projects/{project['id']}", headers=user.headers)).status_code == 404


async def test_invalid_bodies_are_422(client, make_user):
    user = await make_user()
    for body in ({"name": ""}, {"name": "   "}, {"name": "x" * 201}, {}):
        resp = await client.post("/projects", json=body, headers=user.headers)
        assert resp.status_code == 422, body
        assert resp.json()["error"]["code"] == "validation_error"
    project = (await client.post("/projects", json={"name": "a"}, headers=user.headers)).json()["data"]
    resp = await client.patch(f"/projects/{project['id']}", json={"name": None}, headers=user.headers)
    assert resp.status_code == 422


async def test_list_is_newest_first_with_cursor(client, make_user):
    user = await make_user()
    for i in range(5):
        await client.post("/projects", json={"name": f"p{i}"}, headers=user.headers)
    page = (await client.get("/projects?limit=2", headers=user.headers)).json()["data"]
    names = [p["name"] for p in page["items"]]
    while page["next_cursor"]:
        resp = await client.get(f"/projects?limit=2&cursor={page['next_cursor']}", headers=user.headers)
        page = resp.json()["data"]
        names += [p["name"] for p in page["items"]]
    assert names == ["p4", "p3", "p2", "p1", "p0"]
    resp = await client.get("/projects?cursor=bm90LWpzb24", headers=user.headers)
    assert resp.status_code == 422


async def test_other_users_projects_are_404(client, make_user):
    alice, bob = await make_user(), await make_user()
    project = (await client.post("/projects", json={"name": "mine"}, headers=alice.headers)).json()["data"]
    url = f"/projects/{project['id']}"
    assert (await client.get(url, headers=bob.headers)).status_code == 404
    resp = await client.patch(url, json={"name": "stolen"}, headers=bob.headers)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    assert (await client.delete(url, headers=bob.headers)).status_code == 404
    assert (await client.get("/projects", headers=bob.headers)).json()["data"]["items"] == []
    assert (await client.get(url, headers=alice.headers)).json()["data"]["name"] == "mine"
    assert (await client.get(f"/projects/{uuid.uuid4()}", headers=alice.headers)).status_code == 404
    with pytest.raises(NotFound):
        await get_project_service().require_owned(user_id=bob.id, project_id=project["id"])
    await get_project_service().require_owned(user_id=alice.id, project_id=project["id"])


async def test_rls_refuses_writing_a_project_for_someone_else(client, make_user):
    alice, bob = await make_user(), await make_user()
    import psycopg

    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        async with db.as_user(bob.id) as conn:
            await conn.execute("insert into public.projects (user_id, name) values (%s, 'x')", (alice.id,))


async def test_deleting_a_project_keeps_its_assets(client, make_user):
    user = await make_user()
    project = (await client.post("/projects", json={"name": "p"}, headers=user.headers)).json()["data"]
    asset_id = make_asset(user.id)
    sql("update public.assets set project_id = %s where id = %s", (project["id"], asset_id))
    resp = await client.delete(f"/projects/{project['id']}", headers=user.headers)
    assert resp.status_code == 200 and resp.json()["success"] is True
    assert sql("select project_id from public.assets where id = %s", (asset_id,)) == [{"project_id": None}]
    assert (await client.get(f"/projects/{project['id']}", headers=user.headers)).status_code == 404


async def test_projects_need_a_token(client):
    assert (await client.get("/projects")).status_code == 401


async def test_an_account_holds_at_most_a_thousand_projects(client, make_user):
    user, other = await make_user(), await make_user()
    sql("insert into public.projects (user_id, name) select %s, 'p' || n from generate_series(1, 999) n", (user.id,))
    assert (await client.post("/projects", json={"name": "last"}, headers=user.headers)).status_code == 201
    resp = await client.post("/projects", json={"name": "one more"}, headers=user.headers)
    assert resp.status_code == 409, resp.text
    assert resp.json()["error"] == {
        "code": "conflict",
        "message": "An account holds at most 1000 projects: delete one to make room.",
    }
    import psycopg

    with pytest.raises(psycopg.Error) as refused:  # through the Data API too
        async with db.as_user(user.id) as conn:
            await conn.execute("insert into public.projects (user_id, name) values (%s, 'x')", (user.id,))
    assert refused.value.sqlstate == "SPP09"
    # Each account counts its own; a deleted one makes room.
    assert (await client.post("/projects", json={"name": "p"}, headers=other.headers)).status_code == 201
    sql("delete from public.projects where user_id = %s and name = 'p1'", (user.id,))
    assert (await client.post("/projects", json={"name": "again"}, headers=user.headers)).status_code == 201


@pytest.fixture
async def long_history(make_user):
    """一个有 20 个项目、每个项目 100 个任务和 100 个资源的用户，另加一个空项目"""
    user = await make_user()
    sql("insert into public.projects (user_id, name) select %s, 'p' || n from generate_series(1, 21) n", (user.id,))
    projects = [
        str(r["id"]) for r in sql("select id from public.projects where user_id = %s order by name", (user.id,))
    ]
    full = projects[1:]
    sql(
        "insert into public.tasks (user_id, project_id, model_key, params, status, cost)"
        " select %s, p, 'image.upscale', '{}', 'completed', 1 from unnest(%s::uuid[]) p, generate_series(1, 100)",
        (user.id, full),
    )
    sql(
        "insert into public.assets (user_id, project_id, kind, bucket, path, mime, status)"
        " select %s, p, 'image', 'media', %s || '/uploads/' || gen_random_uuid() || '.png', 'image/png', 'ready'"
        " from unnest(%s::uuid[]) p, generate_series(1, 100)",
        (user.id, user.id, full),
    )
    sql("analyze public.tasks, public.assets")
    return user, projects[0], full[0]


@pytest.mark.parametrize(
    ("page", "index"),
    [(TASK_PAGE, "tasks_project_created_idx"), (ASSET_PAGE, "assets_project_created_idx")],
    ids=["tasks", "assets"],
)
async def test_a_projects_page_reads_only_that_projects_rows(long_history, page, index):
    """按项目列出任务和资源走项目索引，不把用户的全部历史读一遍（空项目也一样）"""
    user, empty, full = long_history
    for project in (empty, full):
        params = {"project": project, "kind": None, "status": None, "at": None, "id": None, "limit": 21}
        assert index in plan_as(user.id, page, {**params, "probe_prefix": "probe:"})


async def test_deleting_a_project_reads_no_table_whole(client, long_history):
    """删除项目（任务和资源的 project_id 置空）只读该项目的行，不扫描整张 tasks 和 assets 表"""
    user, _, full = long_history
    with connect() as conn, conn.transaction():
        conn.execute("set local enable_seqscan = off")  # tables this small would be read whole anyway
        conn.execute("delete from public.projects where id = %s", (full,))
        scans = conn.execute(
            "select relname, seq_scan from pg_stat_xact_user_tables where relname in ('tasks', 'assets')"
        ).fetchall()
    assert sorted((r["relname"], r["seq_scan"]) for r in scans) == [("assets", 0), ("tasks", 0)]
    assert sql("select count(*) as n from public.tasks where user_id = %s and project_id is null", (user.id,)) == [
        {"n": 100}
    ]
