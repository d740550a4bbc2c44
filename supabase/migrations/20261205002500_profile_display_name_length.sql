-- profiles.display_name is the one column clients write straight through the Data API (the owner's own row), and
-- nothing bounded it: a signed-in user could store a name of any size, up to a gigabyte a request. It is held to
-- 200 characters, as project names are. NOT VALID: rows written before are left as they are, new writes are checked.

alter table public.profiles add constraint profiles_display_name_length
  check (char_length(display_name) <= 200) not valid;
