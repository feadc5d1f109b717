-- gpuq: Supabase Storage policies for the tokens gpuq's manager gives rented workers.
--
-- Run once in the Supabase project (SQL editor, as postgres); running it again replaces the policies.
-- Not a gpuq migration: the storage and auth schemas exist only on Supabase.
--
-- The manager (manager/credentials.py) signs each live instance a short-lived JWT with the project's JWT
-- secret, role gpuq_storage_worker, and these claims:
--   gpuq_bucket  the output bucket (GPUQ_STORAGE_URL's)
--   gpuq_write   the folders the instance may write, one per queue it serves: ["<prefix>/<queue>/"]
--   gpuq_read    the buckets it may read whole: its queues' input buckets (GPUQ_INPUT_BUCKETS)
-- Only the holder of the JWT secret (the manager, never a host) can make such a token, so its claims are
-- the manager's decisions; these policies hold each token to them. Supabase Auth never gives its users
-- this role, and no policy for `authenticated` or `anon` applies to it except anon's (public) ones.
-- Nothing lets it delete. The service-role key, which bypasses all of this, never goes to a host.

do $$
begin
    create role gpuq_storage_worker nologin;
exception when duplicate_object then
    null;
end $$;
grant gpuq_storage_worker to authenticator;  -- Storage (through authenticator) may take the token's role
grant anon to gpuq_storage_worker;           -- and it gets anon's table privileges, which RLS then narrows

-- Write: into the token's bucket, under one of its folders (starts_with, not LIKE: "_" in a queue name is
-- no wildcard), never through a "." or ".." segment. A claim that is not a list grants nothing.
drop policy if exists "gpuq workers add outputs under their folders" on storage.objects;
create policy "gpuq workers add outputs under their folders" on storage.objects
    for insert to gpuq_storage_worker
    with check (
        bucket_id = (select auth.jwt() ->> 'gpuq_bucket')
        and name !~ '(^|/)\.\.?(/|$)'
        and exists (select 1
                      from jsonb_array_elements_text(case jsonb_typeof((select auth.jwt()) -> 'gpuq_write')
                                                     when 'array' then (select auth.jwt()) -> 'gpuq_write' end)
                           as w (folder)
                     where right(w.folder, 1) = '/' and starts_with(name, w.folder))
    );

-- Overwrite (an upload with upsert, as a retried job's): the same objects, before and after.
drop policy if exists "gpuq workers replace outputs under their folders" on storage.objects;
create policy "gpuq workers replace outputs under their folders" on storage.objects
    for update to gpuq_storage_worker
    using (
        bucket_id = (select auth.jwt() ->> 'gpuq_bucket')
        and exists (select 1
                      from jsonb_array_elements_text(case jsonb_typeof((select auth.jwt()) -> 'gpuq_write')
                                                     when 'array' then (select auth.jwt()) -> 'gpuq_write' end)
                           as w (folder)
                     where right(w.folder, 1) = '/' and starts_with(name, w.folder))
    )
    with check (
        bucket_id = (select auth.jwt() ->> 'gpuq_bucket')
        and name !~ '(^|/)\.\.?(/|$)'
        and exists (select 1
                      from jsonb_array_elements_text(case jsonb_typeof((select auth.jwt()) -> 'gpuq_write')
                                                     when 'array' then (select auth.jwt()) -> 'gpuq_write' end)
                           as w (folder)
                     where right(w.folder, 1) = '/' and starts_with(name, w.folder))
    );

-- Read: its own folders (an upsert and a signed URL of its output need it) and its input buckets.
drop policy if exists "gpuq workers read their folders and input buckets" on storage.objects;
create policy "gpuq workers read their folders and input buckets" on storage.objects
    for select to gpuq_storage_worker
    using (
        bucket_id in (select jsonb_array_elements_text(case jsonb_typeof((select auth.jwt()) -> 'gpuq_read')
                                                       when 'array' then (select auth.jwt()) -> 'gpuq_read' end))
        or (bucket_id = (select auth.jwt() ->> 'gpuq_bucket')
            and exists (select 1
                          from jsonb_array_elements_text(case jsonb_typeof((select auth.jwt()) -> 'gpuq_write')
                                                         when 'array' then (select auth.jwt()) -> 'gpuq_write' end)
                               as w (folder)
                         where right(w.folder, 1) = '/' and starts_with(name, w.folder)))
    );
