-- Upload checks (media.probe tasks) and a few more of Supabase's default client grants.
--
-- 1. An upload's probe is free server work, not a task the user asked for: it no longer counts
--    toward MAX_ACTIVE_TASKS_PER_USER (uploading five photos blocked the next upscale with 429).
--    create_task counts upload checks and the user's own tasks apart; the API caps uploads still
--    being checked on its own (MAX_UPLOAD_CHECKS_PER_USER).
-- 2. A probe that ends without a verdict (failed, canceled, given up by the reaper) rejects its
--    asset, so an upload never stays 'pending' for good.
-- 3. Anonymous sign-ins (if ever enabled) get no signup credits until the account is made
--    permanent; the grant is idempotent on its ref, so it still happens exactly once.
-- 4. Clients lose INSERT/DELETE on profiles, every write on projects for anon, and SELECT on
--    sequences (the ledger's counts every entry ever written: business volume). Table-level
--    write grants also allow LOCK TABLE; authenticated keeps its project writes because the API
--    writes projects as the user, under RLS.

create or replace function public.create_task(
  p_user_id uuid,
  p_model_key text,
  p_params jsonb,
  p_cost bigint,
  p_idempotency_key text default null,
  p_project_id uuid default null,
  p_input_asset_ids uuid[] default '{}',
  p_max_active int default null
)
returns jsonb
language plpgsql security definer set search_path = ''
as $$
declare
  v_balance bigint;
  v_task public.tasks;
  v_active int;
begin
  if p_cost < 0 then
    raise exception 'cost must not be negative' using errcode = '22023';
  end if;
  select a.balance into v_balance from public.credit_accounts a where a.user_id = p_user_id for update;
  if not found then
    raise exception 'no credit account for user %', p_user_id using errcode = 'SP404';
  end if;

  if p_idempotency_key is not null then
    select * into v_task from public.tasks t
    where t.user_id = p_user_id and t.idempotency_key = p_idempotency_key;
    if found then
      return jsonb_build_object('created', false, 'task', to_jsonb(v_task));
    end if;
  end if;

  if p_max_active is not null then
    -- upload checks and the user's own tasks are counted apart
    select count(*) into v_active from public.tasks t
    where t.user_id = p_user_id and t.status in ('queued', 'processing')
      and (t.model_key = 'media.probe') = (p_model_key = 'media.probe');
    if v_active >= p_max_active then
      raise exception 'too many active tasks (% of %)', v_active, p_max_active using errcode = 'SP429';
    end if;
  end if;

  if v_balance < p_cost then
    raise exception 'insufficient credits: balance %, cost %', v_balance, p_cost using errcode = 'SP402';
  end if;

  insert into public.tasks (user_id, project_id, model_key, params, cost, idempotency_key, input_asset_ids)
  values (p_user_id, p_project_id, p_model_key, p_params, p_cost, p_idempotency_key, p_input_asset_ids)
  returning * into v_task;

  if p_cost > 0 then
    insert into public.credit_ledger (user_id, delta, kind, task_id, balance_after)
    values (p_user_id, -p_cost, 'charge', v_task.id, v_balance - p_cost);
    update public.credit_accounts set balance = v_balance - p_cost, updated_at = now()
    where user_id = p_user_id;
  end if;

  return jsonb_build_object('created', true, 'task', to_jsonb(v_task));
end;
$$;

-- A probe that failed or was canceled leaves no verdict: reject the asset it was checking.
create function public.reject_unchecked_upload()
returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  update public.assets
  set status = 'rejected',
      metadata = metadata || jsonb_build_object('reject_reason',
        case new.status
          when 'canceled' then 'The check of this upload was canceled; please upload it again.'
          else 'We could not check this file; please upload it again.'
        end)
  where id = (new.params ->> 'asset_id')::uuid and status = 'pending';
  return null;
end;
$$;
revoke execute on function public.reject_unchecked_upload() from public, anon, authenticated;

create trigger reject_unchecked_upload
  after update of status on public.tasks
  for each row
  when (new.model_key = 'media.probe' and new.status in ('failed', 'canceled') and old.status is distinct from new.status)
  execute function public.reject_unchecked_upload();

-- Signup credits: not for anonymous users; granted when such an account becomes permanent.
create or replace function public.handle_new_user()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v_credits bigint;
begin
  if tg_op = 'INSERT' then
    insert into public.profiles (id, email) values (new.id, new.email) on conflict (id) do nothing;
    insert into public.credit_accounts (user_id) values (new.id) on conflict (user_id) do nothing;
  elsif new.email is not null then
    update public.profiles set email = new.email where id = new.id and email is null;
  end if;
  if new.is_anonymous then
    return new;
  end if;
  select (s.value #>> '{}')::bigint into v_credits from public.app_settings s where s.key = 'signup_credits';
  if coalesce(v_credits, 0) > 0 then
    perform public.grant_credits(new.id, v_credits, 'grant', 'signup:' || new.id::text);
  end if;
  return new;
end;
$$;
revoke execute on function public.handle_new_user() from public, anon, authenticated;

create trigger on_auth_user_made_permanent
  after update on auth.users
  for each row
  when (old.is_anonymous and not new.is_anonymous)
  execute function public.handle_new_user();

revoke insert, delete on public.profiles from anon, authenticated;
revoke insert, update, delete on public.projects from anon;
revoke all on all sequences in schema public from anon, authenticated;
alter default privileges in schema public revoke all on sequences from anon, authenticated;
