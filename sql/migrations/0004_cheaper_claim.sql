-- gpuq 0004: a cheaper claim/complete path, same semantics. Measured per job (claim(50) + complete_jobs of
-- those 50, one connection, batches of the old and new schema interleaved): about 88 -> 76 µs round trip.
--
-- 1. claim_jobs was planned afresh on every call (~0.2 ms, ~4 µs a job at p_limit 50): plpgsql kept a custom
--    plan because the generic one hash-joined `picked` against a seq scan of all jobs (it guesses
--    LIMIT p_limit at 10% of the rows). The update now takes its rows by primary key
--    (id = any (array(...))), whose generic plan is the same as the custom one at any table size, and the
--    function keeps that generic plan (plan_cache_mode). That plan's estimate, costed for LIMIT p_limit at 10%
--    of the queue, passes jit_above_cost on a big queue: JIT would then add ~13 ms to every claim at 10^6
--    queued, hence jit = off. The two it calls when leases have expired keep
--    choosing as before (plan_cache_mode = auto). Otherwise unchanged.
-- 2. queue_must_be_a_lowercase_name was a regex, evaluated on every UPDATE of a job (Postgres checks every
--    CHECK on every update, changed column or not): ~2.5 µs per update, two updates per job. The same rule
--    without a regex: 1-63 characters from [a-z0-9_.-], the first not one of _ . - .
-- 3. gpuq_done's payload is built by concatenation instead of json_build_object, byte for byte the same text
--    ({"id" : 1, "status" : "succeeded", "queue" : "q"}): ids are numbers, statuses enum labels and queue
--    names match the check above, so nothing in it needs escaping.

-- (1)
-- Claim up to p_limit jobs for one instance: queue by queue in the order given, each queue by priority
-- (highest first), then run_after, then id. Each claim bumps the attempt. Jobs whose lease expired
-- (their worker went silent) are first put back in the queue, in the same transaction, so they are
-- claimed like any other: no separate sweeper is needed.
create or replace function gpuq.claim_jobs(
    p_instance_id   bigint,
    p_queues        text[],
    p_limit         integer default 1,
    p_vram_mb       integer default null,
    p_lease_seconds integer default 60
) returns setof gpuq.jobs
language plpgsql security definer set search_path = pg_catalog, pg_temp
set plan_cache_mode = force_generic_plan set jit = off as $$
declare
    n integer;
begin
    if p_limit is null or p_limit < 1 then
        return;
    end if;
    if p_lease_seconds is null or p_lease_seconds < 1 then
        raise exception using errcode = 'GQ400', message = 'p_lease_seconds must be at least 1';
    end if;
    -- a cheap probe of jobs_lease_idx: only then is there anything to end or requeue
    if exists (select 1 from gpuq.jobs where status = 'running' and lease_expires_at < now()) then
        perform gpuq._end_expired(p_queues);
        perform gpuq._requeue_expired(p_queues);
    end if;

    return query
    with ready as (
        select j.id, q.pos, j.priority, j.run_after
          from unnest(p_queues) with ordinality as q (name, pos)
          cross join lateral (
              select id, priority, run_after from gpuq.jobs
               where queue = q.name and status = 'queued' and run_after <= now()
                 and min_vram_mb <= coalesce(p_vram_mb, 2147483647)
               order by priority desc, run_after, id
               limit p_limit
               for update skip locked
          ) as j
    ), picked as (
        select id from ready order by pos, priority desc, run_after, id limit p_limit
    )
    update gpuq.jobs j
       set status = 'running',
           attempt = j.attempt + 1,
           instance_id = p_instance_id,
           lease_expires_at = now() + make_interval(secs => p_lease_seconds),
           started_at = now(),
           progress = null,
           progress_message = null
     where j.id = any (array(select id from picked))
    returning j.*;

    get diagnostics n = row_count;
    if n > 0 then
        update gpuq.instances set status = 'busy', last_job_at = now()
         where id = p_instance_id and status in ('requested', 'booting', 'idle');
    end if;
end $$;

-- what claim_jobs calls when leases expired plans as it did before 0004
alter function gpuq._end_expired(text[]) set plan_cache_mode = auto;
alter function gpuq._requeue_expired(text[]) set plan_cache_mode = auto;

-- (2) Equivalent to queue ~ '^[a-z0-9][a-z0-9_.-]{0,62}$' (the octet length is the character count here: any
-- other character fails the ltrim test).
alter table gpuq.jobs drop constraint queue_must_be_a_lowercase_name,
    add constraint queue_must_be_a_lowercase_name check (
        octet_length(queue) between 1 and 63
        and ltrim(queue, '0123456789abcdefghijklmnopqrstuvwxyz_.-') = ''
        and left(queue, 1) not in ('_', '.', '-'));

-- (3)
create or replace function gpuq._notify_finished(p_id bigint, p_status gpuq.job_status, p_queue text) returns void
language sql as $$
    select pg_notify('gpuq_done', '{"id" : ' || p_id || ', "status" : "' || p_status || '", "queue" : "'
                                  || p_queue || '"}')
$$;
