-- Clients (the Data API, and the API writing as the user under RLS) wrote every column of their projects: a
-- project's id could be changed (breaking links to it) and its created_at set to any date (reordering lists).
-- They now insert and update a project's name and description only; id, user_id on update, and the times are
-- the server's.

revoke insert, update on public.projects from authenticated;
grant insert (user_id, name, description) on public.projects to authenticated;
grant update (name, description, updated_at) on public.projects to authenticated;
