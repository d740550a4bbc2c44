-- Projects stored with a blank name before names were checked are renamed, and the check then holds for every row.
--
-- projects_name_not_blank came NOT VALID, but Postgres checks a constraint on every new version of a row: a project
-- stored blank before could not be changed at all (its description, say) unless the same statement renamed it, and
-- the API, which writes only the fields it is given, failed on it. Such a project is named 'Untitled', as a client
-- would show it, and the check is validated.

update public.projects set name = 'Untitled' where btrim(name, E' \t\n\r\f\v') = '';

alter table public.projects validate constraint projects_name_not_blank;
