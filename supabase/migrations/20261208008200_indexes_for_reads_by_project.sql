-- Reads by project that no index served:
-- * GET /tasks?project_id= and GET /assets?project_id= walked the caller's whole history (user_id index) to find
--   one project's rows, all of it for a project with few or none.
-- * Deleting a project sets project_id to null in tasks and assets (on delete set null): with no index on
--   project_id each delete read both tables whole, every user's rows, under the project's lock.
create index if not exists tasks_project_created_idx on public.tasks (project_id, created_at desc, id desc)
  where project_id is not null;
create index if not exists assets_project_created_idx on public.assets (project_id, created_at desc, id desc)
  where project_id is not null;
