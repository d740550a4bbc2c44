-- A request made as a user checks first that the token's account still exists (a token outlives its deleted user
-- by up to an hour). Raising here, inside the request's transaction, lets the API send the check, the claims, its
-- queries and the commit in one round trip: a failed check aborts everything after it, so a departed account's
-- query never runs. SQLSTATE SP401.
create or replace function public.require_account(p_user_id uuid)
returns void
language plpgsql stable security definer set search_path = ''
as $$
begin
  if not exists (select 1 from auth.users u where u.id = p_user_id) then
    raise exception 'no account %', p_user_id using errcode = 'SP401';
  end if;
end;
$$;
revoke execute on function public.require_account(uuid) from public, anon, authenticated;
grant execute on function public.require_account(uuid) to service_role;
