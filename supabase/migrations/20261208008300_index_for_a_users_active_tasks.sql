-- create_task counts the caller's active tasks (the per-user limit) on every POST /tasks, and
-- GET /tasks?status=queued|processing lists them. No index held a user's active tasks alone: the count read the
-- caller's whole history (an index on user_id) and every user's active tasks (tasks_active_idx), more with each
-- task a user ever ran and with every task queued behind a busy GPU. This one holds only active tasks, by user.
create index if not exists tasks_user_active_idx on public.tasks (user_id, created_at desc, id desc)
  where status in ('queued', 'processing');
