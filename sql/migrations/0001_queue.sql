-- gpuq 0001: the queue. Jobs, instances, history, and one function per state transition.
--
-- Job:      queued -> running -> succeeded | failed | cancelled
--           running -> queued  (retry with backoff, lease expiry, release by a draining worker)
-- Instance: requested -> booting -> idle <-> busy -> draining -> terminated
--           booting -> failed (never ready); any -> lost (the provider no longer shows it)
--
-- Fencing: every claim bumps `attempt`; progress, complete and fail present (job_id, attempt), so a
-- worker that lost its lease cannot overwrite the work of the one that took over.
-- `releases` counts hand-backs by draining workers: they bump `attempt` (the fence) but do not use
-- up an attempt, so the attempts used are `attempt - releases`.
--
-- Custom SQLSTATEs raised here (the Python client maps them):
--   GQ404  no such job / instance
--   GQ409  the caller no longer holds that (job_id, attempt)
--   GQ400  a request that can never succeed (bad argument to a function)

create type gpuq.job_status as enum ('queued', 'running', 'succeeded', 'failed', 'cancelled');
create type gpuq.instance_status as enum
    ('requested', 'booting', 'idle', 'busy', 'draining', 'terminated', 'failed', 'lost');

-- The error taxonomy (worker/errors.py holds the same codes).
create table gpuq.error_codes (
    code        text primary key,
    retryable   boolean not null,
    description text not null
);
insert into gpuq.error_codes (code, retryable, description) values
    ('INPUT_INVALID',       false, 'the payload is wrong; fix it and enqueue again'),
    ('WORKFLOW_INVALID',    false, 'the workflow template or graph is wrong'),
    ('GPU_OOM',             true,  'out of GPU memory'),
    ('BACKEND_UNAVAILABLE', true,  'the inference server is down or not ready'),
    ('BACKEND_ERROR',       true,  'the backend raised while running the job'),
    ('INPUT_FETCH_FAILED',  true,  'an input could not be fetched'),
    ('UPLOAD_FAILED',       true,  'an output could not be stored'),
    ('TIMEOUT',             true,  'the job ran past its timeout'),
    ('LEASE_EXPIRED',       true,  'the worker holding the job went silent'),
    ('CANCELLED',           false, 'cancelled on request'),
    ('WORKER_ERROR',        true,  'an unexpected error in the worker');

create table gpuq.instances (
    id                   bigint generated always as identity primary key,
    provider             text not null default 'manual'
        constraint provider_must_be_a_lowercase_name check (provider ~ '^[a-z][a-z0-9_]{0,31}$'),
    provider_instance_id text,
    offer_id             text,
    machine_id           text,
    label                text,
    status               gpuq.instance_status not null default 'requested',
    gpu_name             text,
    gpu_count            integer,
    vram_mb              integer,
    dph                  numeric(12, 6) constraint dph_must_not_be_negative check (dph >= 0),
    interruptible        boolean,
    queues               text[] not null default '{}',
    backends             text[] not null default '{}',
    max_concurrency      integer,
    version              text,
    hostname             text,
    metrics              jsonb not null default '{}',
    created_at           timestamptz not null default now(),
    ready_at             timestamptz,
    last_heartbeat_at    timestamptz,
    last_job_at          timestamptz,
    terminated_at        timestamptz,
    end_reason           text,
    constraint one_row_per_provider_instance unique (provider, provider_instance_id)
);
create index instances_live_idx on gpuq.instances (provider, status)
    where status not in ('terminated', 'failed', 'lost');

-- Money is state: every rent, state change, price change and destroy, with the price at that moment.
create table gpuq.instance_events (
    id          bigint generated always as identity primary key,
    instance_id bigint not null references gpuq.instances (id) on delete cascade,
    at          timestamptz not null default now(),
    event       text not null,
    status      gpuq.instance_status,
    dph         numeric(12, 6),
    message     text,
    details     jsonb
);
create index instance_events_instance_idx on gpuq.instance_events (instance_id, at);

create table gpuq.jobs (
    id                  bigint generated always as identity primary key,
    queue               text not null default 'default'
        constraint queue_must_be_a_lowercase_name check (queue ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    payload             jsonb not null default '{}'
        constraint payload_must_be_a_json_object check (jsonb_typeof(payload) = 'object'),
    priority            smallint not null default 0
        constraint priority_must_be_between_minus_100_and_100 check (priority between -100 and 100),
    run_after           timestamptz not null default now(),
    max_attempts        integer not null default 3
        constraint max_attempts_must_be_between_1_and_100 check (max_attempts between 1 and 100),
    timeout_seconds     integer not null default 3600
        constraint timeout_seconds_must_be_between_1_and_604800 check (timeout_seconds between 1 and 604800),
    min_vram_mb         integer not null default 0
        constraint min_vram_mb_must_be_between_0_and_1048576 check (min_vram_mb between 0 and 1048576),
    idempotency_key     text
        constraint idempotency_key_must_be_1_to_200_characters check (length(idempotency_key) between 1 and 200),
    status              gpuq.job_status not null default 'queued',
    attempt             integer not null default 0,
    releases            integer not null default 0,
    instance_id         bigint references gpuq.instances (id) on delete set null,
    lease_expires_at    timestamptz,
    started_at          timestamptz,
    finished_at         timestamptz,
    cancel_requested_at timestamptz,
    progress            smallint,
    progress_message    text,
    result              jsonb,
    error_code          text references gpuq.error_codes (code),
    error_message       text,
    created_at          timestamptz not null default now(),
    constraint running_jobs_have_a_lease check (status <> 'running' or lease_expires_at is not null),
    constraint finished_jobs_have_finished_at
        check ((status in ('succeeded', 'failed', 'cancelled')) = (finished_at is not null))
) with (
    -- a queue table churns: leave room for HOT updates (progress) and vacuum it early and often
    fillfactor = 90,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 500,
    autovacuum_analyze_scale_factor = 0.02
);

-- The claim path: only queued rows, in claim order. Finished history never enters this index.
create index jobs_claim_idx on gpuq.jobs (queue, priority desc, run_after, id) where status = 'queued';
-- Running jobs by lease: expired leases for the claim and reap; a heartbeat's jobs (few per instance).
create index jobs_lease_idx on gpuq.jobs (lease_expires_at) where status = 'running';
create index jobs_finished_idx on gpuq.jobs (finished_at) where finished_at is not null;
-- No two live jobs share an idempotency key; a plain INSERT of a duplicate fails on this index's name.
create unique index jobs_live_idempotency_key on gpuq.jobs (idempotency_key)
    where idempotency_key is not null and status in ('queued', 'running');

-- Append-only history: one row per attempt that did not end in success, and per notable event. The
-- successful attempt is the job row itself (instance_id, started_at, finished_at), so the hot path of a
-- healthy queue writes no history row; job_history() shows both.
create table gpuq.job_events (
    id          bigint generated always as identity primary key,
    job_id      bigint not null references gpuq.jobs (id) on delete cascade,
    attempt     integer not null,
    event       text not null constraint event_must_be_known check (event in (
                    'failed', 'retry_scheduled', 'lease_expired', 'released',
                    'cancel_requested', 'cancelled', 'retried')),
    at          timestamptz not null default now(),
    instance_id bigint references gpuq.instances (id) on delete set null,
    started_at  timestamptz,  -- for events that end an attempt: when it started (cost, run time)
    error_code  text,
    message     text,
    details     jsonb  -- e.g. a traceback; never copied into the job's result
);
create index job_events_job_idx on gpuq.job_events (job_id, id);

create table gpuq.queue_settings (  -- reserved for per-queue defaults; empty means built-in defaults
    queue text primary key constraint queue_must_be_a_lowercase_name check (queue ~ '^[a-z0-9][a-z0-9_.-]{0,62}$')
);

---------------------------------------------------------------------------------------------------
-- Insert guard and wake-up. A plain INSERT is a supported way to enqueue: it must start a job clean.

create function gpuq._check_new_job() returns trigger
language plpgsql as $$
begin
    if new.status <> 'queued' or new.attempt <> 0 or new.releases <> 0 or new.instance_id is not null
       or new.lease_expires_at is not null or new.started_at is not null or new.finished_at is not null
       or new.cancel_requested_at is not null or new.progress is not null or new.result is not null
       or new.error_code is not null or new.error_message is not null then
        raise exception using
            errcode = '23514',
            message = 'a new job must start queued and clean',
            hint = 'insert only queue, payload, priority, run_after, max_attempts, timeout_seconds, '
                   'min_vram_mb and idempotency_key; the rest is set by gpuq''s functions';
    end if;
    return new;
end $$;

create trigger jobs_check_new before insert on gpuq.jobs
    for each row execute function gpuq._check_new_job();

-- One NOTIFY per queue per statement, however many rows the statement inserts.
create function gpuq._notify_enqueued() returns trigger
language plpgsql as $$
begin
    perform pg_notify('gpuq_jobs', q.queue)
       from (select distinct queue from new_jobs where run_after <= now()) as q;
    return null;
end $$;

create trigger jobs_notify_enqueued after insert on gpuq.jobs
    referencing new table as new_jobs
    for each statement execute function gpuq._notify_enqueued();

---------------------------------------------------------------------------------------------------
-- Small internals shared by the transitions.

-- Exponential backoff with equal jitter: attempt n waits between d/2 and d, d = min(base * 2^(n-1), max).
-- base and max are settings an operator may change per database or role, e.g.
--   alter database app set gpuq.retry_base_seconds = 30;
-- (defaults 10 s and 3600 s).
create function gpuq.retry_delay(p_attempts_used integer) returns interval
language sql volatile as $$
    select make_interval(secs => d / 2 + random() * d / 2)
      from (select least(coalesce(nullif(current_setting('gpuq.retry_max_seconds', true), '')::float8, 3600),
                         coalesce(nullif(current_setting('gpuq.retry_base_seconds', true), '')::float8, 10)
                         * power(2, greatest(p_attempts_used, 1) - 1)) as d) as x
$$;

create function gpuq._notify_finished(p_id bigint, p_status gpuq.job_status, p_queue text) returns void
language sql as $$
    select pg_notify('gpuq_done', json_build_object('id', p_id, 'status', p_status, 'queue', p_queue)::text)
$$;

create function gpuq._job_not_held(p_job_id bigint, p_attempt integer) returns void
language plpgsql as $$
declare
    j gpuq.jobs;
begin
    select * into j from gpuq.jobs where id = p_job_id;
    if not found then
        raise exception using errcode = 'GQ404', message = format('job %s does not exist', p_job_id);
    end if;
    raise exception using
        errcode = 'GQ409',
        message = format('job %s attempt %s is no longer held: it is %s at attempt %s',
                         p_job_id, p_attempt, j.status, j.attempt);
end $$;

-- The job row, locked for this transaction; GQ404 when there is none.
create function gpuq._lock_job(p_job_id bigint) returns gpuq.jobs
language plpgsql as $$
declare
    j gpuq.jobs;
begin
    select * into j from gpuq.jobs where id = p_job_id for update;
    if not found then
        raise exception using errcode = 'GQ404', message = format('job %s does not exist', p_job_id);
    end if;
    return j;
end $$;

-- End running jobs whose lease expired and that must not run again (attempts used up, or cancel
-- requested while their worker was gone). Claimable ones are taken by claim_jobs directly.
create function gpuq._end_expired(p_queues text[]) returns integer
language plpgsql as $$
declare
    n integer;
begin
    with dead as (
        select id from gpuq.jobs
         where status = 'running' and lease_expires_at < now()
           and (p_queues is null or queue = any (p_queues))
           and (attempt - releases >= max_attempts or cancel_requested_at is not null)
         for update skip locked
    ), ended as (
        update gpuq.jobs j
           set status = case when j.cancel_requested_at is not null
                             then 'cancelled' else 'failed' end::gpuq.job_status,
               error_code = case when j.cancel_requested_at is not null then 'CANCELLED' else 'LEASE_EXPIRED' end,
               error_message = case when j.cancel_requested_at is not null
                                    then 'cancelled while its worker was unreachable'
                                    else format('the worker went silent and all %s attempts are used', j.max_attempts)
                               end,
               finished_at = now(), lease_expires_at = null
          from dead
         where j.id = dead.id
        returning j.id, j.attempt, j.status, j.queue, j.instance_id, j.started_at, j.error_code, j.error_message
    ), logged as (
        insert into gpuq.job_events (job_id, attempt, event, instance_id, started_at, error_code, message)
        select id, attempt, case when status = 'cancelled' then 'cancelled' else 'lease_expired' end,
               instance_id, started_at, error_code, error_message
          from ended
    )
    select count(*) into n from (select gpuq._notify_finished(id, status, queue) from ended) as x;
    return n;
end $$;

-- Put running jobs whose lease expired back in the queue, as claimable as they were when the lease
-- ran out (run_after = that moment, for wait stats); each leaves a lease_expired event naming the
-- instance that went silent. Run after _end_expired, which ends those that must not run again.
create function gpuq._requeue_expired(p_queues text[]) returns integer
language plpgsql as $$
declare
    n integer;
begin
    with expired as (
        select id, instance_id from gpuq.jobs
         where status = 'running' and lease_expires_at < now()
           and (p_queues is null or queue = any (p_queues))
           and attempt - releases < max_attempts and cancel_requested_at is null
         for update skip locked
    ), requeued as (
        update gpuq.jobs j
           set status = 'queued', run_after = j.lease_expires_at, lease_expires_at = null, instance_id = null,
               error_code = 'LEASE_EXPIRED', error_message = 'the worker went silent'
          from expired
         where j.id = expired.id
        returning j.id, j.attempt, j.queue, j.started_at, expired.instance_id
    ), logged as (
        insert into gpuq.job_events (job_id, attempt, event, instance_id, started_at, error_code, message)
        select id, attempt, 'lease_expired', instance_id, started_at, 'LEASE_EXPIRED',
               'the worker went silent; queued again'
          from requeued
    )
    select count(*) into n from (select pg_notify('gpuq_jobs', queue) from requeued) as x;
    return n;
end $$;

---------------------------------------------------------------------------------------------------
-- The transitions.

create function gpuq.enqueue(
    p_queue           text,
    p_payload         jsonb default '{}',
    p_priority        integer default 0,
    p_run_after       timestamptz default null,
    p_max_attempts    integer default 3,
    p_timeout_seconds integer default 3600,
    p_min_vram_mb     integer default 0,
    p_idempotency_key text default null
) returns bigint
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    v_id bigint;
begin
    if p_priority not between -100 and 100 then  -- before the smallint cast can overflow
        raise exception using errcode = 'GQ400',
            message = format('priority must be between -100 and 100, got %s', p_priority);
    end if;
    loop
        insert into gpuq.jobs (queue, payload, priority, run_after, max_attempts, timeout_seconds,
                               min_vram_mb, idempotency_key)
        values (p_queue, coalesce(p_payload, '{}'), p_priority, coalesce(p_run_after, now()),
                coalesce(p_max_attempts, 3), coalesce(p_timeout_seconds, 3600), coalesce(p_min_vram_mb, 0),
                p_idempotency_key)
        on conflict (idempotency_key) where idempotency_key is not null and status in ('queued', 'running')
        do nothing
        returning id into v_id;
        if v_id is not null then
            return v_id;
        end if;
        -- a live job already carries this key: hand back its id (loop if it finished meanwhile)
        select id into v_id from gpuq.jobs
         where idempotency_key = p_idempotency_key and status in ('queued', 'running');
        if v_id is not null then
            return v_id;
        end if;
    end loop;
end $$;

-- Claim up to p_limit jobs for one instance: queue by queue in the order given, each queue by priority
-- (highest first), then run_after, then id. Each claim bumps the attempt. Jobs whose lease expired
-- (their worker went silent) are first put back in the queue, in the same transaction, so they are
-- claimed like any other: no separate sweeper is needed.
create function gpuq.claim_jobs(
    p_instance_id   bigint,
    p_queues        text[],
    p_limit         integer default 1,
    p_vram_mb       integer default null,
    p_lease_seconds integer default 60
) returns setof gpuq.jobs
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
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
      from picked
     where j.id = picked.id
    returning j.*;

    get diagnostics n = row_count;
    if n > 0 then
        update gpuq.instances set status = 'busy', last_job_at = now()
         where id = p_instance_id and status in ('requested', 'booting', 'idle');
    end if;
end $$;

-- Called by a worker well inside its lease. Extends the leases it holds and answers what it must do:
--   (job_id, attempt, 'cancel')   cancellation requested for that job: stop it, then fail_job(CANCELLED)
--   (job_id, attempt, 'timeout')  the job ran past timeout_seconds: stop it, then fail_job(TIMEOUT)
--   (job_id, attempt, 'lost')     the worker no longer holds that attempt: stop it, report nothing
--   (null,   null,    'drain')    the instance is draining: claim nothing more
--   (null,   null,    'shutdown') the instance is terminated or lost: release and exit
create function gpuq.heartbeat(
    p_instance_id   bigint,
    p_job_ids       bigint[] default '{}',
    p_attempts      integer[] default '{}',
    p_metrics       jsonb default null,
    p_lease_seconds integer default 60
) returns table (job_id bigint, attempt integer, action text)
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    v_status gpuq.instance_status;
begin
    if coalesce(cardinality(p_job_ids), 0) <> coalesce(cardinality(p_attempts), 0) then
        raise exception using errcode = 'GQ400', message = 'p_job_ids and p_attempts must have the same length';
    end if;

    update gpuq.jobs j
       set lease_expires_at = now() + make_interval(secs => p_lease_seconds)
     where j.instance_id = p_instance_id and j.status = 'running'
       and j.cancel_requested_at is null
       and j.started_at + make_interval(secs => j.timeout_seconds) > now();

    update gpuq.instances i
       set last_heartbeat_at = now(),
           metrics = coalesce(p_metrics, i.metrics),
           ready_at = coalesce(i.ready_at, now()),
           status = case
               when i.status in ('requested', 'booting', 'idle', 'busy') then
                   case when exists (select 1 from gpuq.jobs r
                                      where r.instance_id = i.id and r.status = 'running')
                        then 'busy' else 'idle' end::gpuq.instance_status
               else i.status end
     where i.id = p_instance_id
    returning i.status into v_status;
    if not found then
        raise exception using errcode = 'GQ404', message = format('instance %s does not exist', p_instance_id);
    end if;

    return query
    select j.id, j.attempt, case when j.cancel_requested_at is not null then 'cancel' else 'timeout' end
      from gpuq.jobs j
     where j.instance_id = p_instance_id and j.status = 'running'
       and (j.cancel_requested_at is not null
            or j.started_at + make_interval(secs => j.timeout_seconds) <= now())
    union all
    select h.id, h.attempt, 'lost'
      from unnest(p_job_ids, p_attempts) as h (id, attempt)
     where not exists (select 1 from gpuq.jobs j
                        where j.id = h.id and j.attempt = h.attempt and j.status = 'running'
                          and j.instance_id = p_instance_id)
    union all
    select null, null, case when v_status = 'draining' then 'drain' else 'shutdown' end
     where v_status in ('draining', 'terminated', 'failed', 'lost');
end $$;

create function gpuq.report_progress(p_job_id bigint, p_attempt integer, p_percent integer,
                                     p_message text default null) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    update gpuq.jobs
       set progress = least(greatest(p_percent, 0), 100), progress_message = left(p_message, 500)
     where id = p_job_id and attempt = p_attempt and status = 'running';
    if not found then
        perform gpuq._job_not_held(p_job_id, p_attempt);
    end if;
    perform pg_notify('gpuq_progress', json_build_object('id', p_job_id, 'progress', least(greatest(p_percent, 0), 100),
                                                         'message', left(p_message, 500))::text);
end $$;

-- Complete many jobs in one transaction. Answers, for each job given, whether it was completed;
-- false means that (job_id, attempt) is no longer held (its lease passed and another worker took it).
create function gpuq.complete_jobs(p_job_ids bigint[], p_attempts integer[], p_results jsonb[] default null)
returns table (job_id bigint, completed boolean)
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    if cardinality(p_job_ids) <> cardinality(p_attempts)
       or (p_results is not null and cardinality(p_results) <> cardinality(p_job_ids)) then
        raise exception using errcode = 'GQ400', message = 'p_job_ids, p_attempts and p_results must have the same length';
    end if;
    if exists (select 1 from unnest(p_results) as r (v) where v is not null and jsonb_typeof(v) <> 'object') then
        raise exception using errcode = 'GQ400', message = 'a job result must be a JSON object';
    end if;

    return query
    with given as (
        select g.id, g.attempt, g.result
          from unnest(p_job_ids, p_attempts, coalesce(p_results, array[]::jsonb[])) as g (id, attempt, result)
    ), done as (
        update gpuq.jobs j
           set status = 'succeeded', result = coalesce(given.result, '{}'), finished_at = now(),
               lease_expires_at = null, progress = 100, error_code = null, error_message = null
          from given
         -- driven by the primary key (= any), not by a join the planner may turn into a scan of all
         -- running jobs per given row
         where j.id = any (p_job_ids) and j.id = given.id and j.attempt = given.attempt and j.status = 'running'
        returning j.id, j.queue, j.instance_id
    ), touched as (
        update gpuq.instances i set last_job_at = now()
         where i.id in (select instance_id from done)
    ), notified as (
        select done.id, gpuq._notify_finished(done.id, 'succeeded', done.queue) from done
    )
    select given.id, exists (select 1 from notified n where n.id = given.id)
      from given;
end $$;

create function gpuq.complete_job(p_job_id bigint, p_attempt integer, p_result jsonb default '{}')
returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    if not (select c.completed from gpuq.complete_jobs(array[p_job_id], array[p_attempt], array[p_result]) as c) then
        perform gpuq._job_not_held(p_job_id, p_attempt);
    end if;
end $$;

-- Fail one attempt. Retryable errors go back to the queue after a backoff while attempts remain;
-- others fail the job at once. A job whose cancellation was requested ends cancelled.
-- Answers the job's new status.
create function gpuq.fail_job(
    p_job_id     bigint,
    p_attempt    integer,
    p_error_code text,
    p_message    text,
    p_retryable  boolean default null,  -- null: the code's default
    p_details    jsonb default null     -- e.g. {"traceback": "..."}; kept in the history only
) returns gpuq.job_status
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    j gpuq.jobs;
    v_retryable boolean;
    v_status gpuq.job_status;
    v_event text;
begin
    select e.retryable into v_retryable from gpuq.error_codes e where e.code = p_error_code;
    if not found then
        raise exception using errcode = 'GQ400',
            message = format('unknown error code %L', p_error_code),
            hint = 'see select code from gpuq.error_codes';
    end if;
    v_retryable := coalesce(p_retryable, v_retryable);

    select * into j from gpuq.jobs where id = p_job_id and attempt = p_attempt and status = 'running' for update;
    if not found then
        perform gpuq._job_not_held(p_job_id, p_attempt);
    end if;

    if j.cancel_requested_at is not null then
        v_status := 'cancelled'; v_event := 'cancelled';
    elsif v_retryable and j.attempt - j.releases < j.max_attempts then
        v_status := 'queued'; v_event := 'retry_scheduled';
    else
        v_status := 'failed'; v_event := 'failed';
    end if;

    update gpuq.jobs
       set status = v_status,
           error_code = case when v_status = 'cancelled' then 'CANCELLED' else p_error_code end,
           error_message = left(coalesce(p_message, p_error_code), 2000),
           lease_expires_at = null,
           run_after = case when v_status = 'queued' then now() + gpuq.retry_delay(j.attempt - j.releases)
                            else run_after end,
           finished_at = case when v_status = 'queued' then null else now() end,
           instance_id = case when v_status = 'queued' then null else instance_id end
     where id = p_job_id;

    insert into gpuq.job_events (job_id, attempt, event, instance_id, started_at, error_code, message, details)
    values (p_job_id, p_attempt, v_event, j.instance_id, j.started_at, p_error_code, p_message, p_details);
    update gpuq.instances set last_job_at = now() where id = j.instance_id;
    if v_status <> 'queued' then
        perform gpuq._notify_finished(p_job_id, v_status, j.queue);
    end if;
    return v_status;
end $$;

-- Cancel: a queued job ends at once; a running one is asked to stop through its worker's heartbeat.
-- Finished jobs are left as they are. Answers the job's status after the call.
create function gpuq.cancel_job(p_job_id bigint) returns gpuq.job_status
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    j gpuq.jobs;
begin
    j := gpuq._lock_job(p_job_id);
    if j.status = 'queued' then
        update gpuq.jobs
           set status = 'cancelled', finished_at = now(), error_code = 'CANCELLED',
               error_message = 'cancelled before it ran'
         where id = p_job_id;
        insert into gpuq.job_events (job_id, attempt, event, error_code, message)
        values (p_job_id, j.attempt, 'cancelled', 'CANCELLED', 'cancelled before it ran');
        perform gpuq._notify_finished(p_job_id, 'cancelled', j.queue);
        return 'cancelled';
    elsif j.status = 'running' and j.cancel_requested_at is null then
        update gpuq.jobs set cancel_requested_at = now() where id = p_job_id;
        insert into gpuq.job_events (job_id, attempt, event, instance_id)
        values (p_job_id, j.attempt, 'cancel_requested', j.instance_id);
    end if;
    return j.status;
end $$;

-- A draining worker hands running jobs back: queued again at once, no attempt used up. A job whose
-- cancellation was requested ends cancelled instead. p_job_ids null: every job the instance holds.
-- Answers how many went back to the queue.
create function gpuq.release_jobs(p_instance_id bigint, p_job_ids bigint[] default null) returns integer
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    n integer;
begin
    with ended as (
        update gpuq.jobs j
           set status = 'cancelled', finished_at = now(), lease_expires_at = null,
               error_code = 'CANCELLED', error_message = 'cancelled while running'
         where j.instance_id = p_instance_id and j.status = 'running' and j.cancel_requested_at is not null
           and (p_job_ids is null or j.id = any (p_job_ids))
        returning j.id, j.attempt, j.queue, j.started_at
    ), logged as (
        insert into gpuq.job_events (job_id, attempt, event, instance_id, started_at, error_code, message)
        select id, attempt, 'cancelled', p_instance_id, started_at, 'CANCELLED', 'cancelled while running'
          from ended
    )
    select count(*) into n from (select gpuq._notify_finished(id, 'cancelled', queue) from ended) as x;

    with released as (
        update gpuq.jobs j
           set status = 'queued', releases = j.releases + 1, run_after = now(), lease_expires_at = null,
               instance_id = null, progress = null, progress_message = null
         where j.instance_id = p_instance_id and j.status = 'running'
           and (p_job_ids is null or j.id = any (p_job_ids))
        returning j.id, j.attempt, j.queue, j.started_at
    ), logged as (
        insert into gpuq.job_events (job_id, attempt, event, instance_id, started_at, message)
        select id, attempt, 'released', p_instance_id, started_at, 'handed back by a draining worker'
          from released
    )
    select count(*) into n from (select pg_notify('gpuq_jobs', queue) from released) as x;
    return n;
end $$;

-- Operator's retry of a failed or cancelled job: queued again now, with one more attempt allowed.
create function gpuq.retry_job(p_job_id bigint) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    j gpuq.jobs;
begin
    j := gpuq._lock_job(p_job_id);
    if j.status not in ('failed', 'cancelled') then
        raise exception using errcode = 'GQ400',
            message = format('job %s is %s; only failed or cancelled jobs can be retried', p_job_id, j.status);
    end if;
    update gpuq.jobs
       set status = 'queued', run_after = now(), finished_at = null, cancel_requested_at = null,
           max_attempts = greatest(max_attempts, attempt - releases + 1), instance_id = null,
           result = null, progress = null, progress_message = null
     where id = p_job_id;
    insert into gpuq.job_events (job_id, attempt, event, message)
    values (p_job_id, j.attempt, 'retried', format('retried by an operator after %s', j.status));
    perform pg_notify('gpuq_jobs', j.queue);
end $$;

-- Return running jobs whose lease expired to the queue (or end them when no attempt is left), without
-- waiting for a worker's claim to do it, so queue depth is right for the manager. Answers the count.
create function gpuq.reap_expired() returns integer
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    return gpuq._end_expired(null) + gpuq._requeue_expired(null);
end $$;

-- Delete finished jobs (and their history) that ended before now() - p_older_than, at most p_limit
-- per call, so one call stays short. Answers how many were deleted; call again while it answers p_limit.
create function gpuq.prune_jobs(p_older_than interval default '7 days', p_limit integer default 10000)
returns integer
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    n integer;
begin
    if p_older_than < interval '0' then
        raise exception using errcode = 'GQ400', message = 'p_older_than must not be negative';
    end if;
    delete from gpuq.jobs
     where id in (select id from gpuq.jobs
                   where finished_at < now() - p_older_than
                   order by finished_at
                   limit p_limit);
    get diagnostics n = row_count;
    return n;
end $$;

---------------------------------------------------------------------------------------------------
-- Instances, as the worker sees them. (The manager's rent/destroy transitions come with the manager.)

-- A worker starting up. With a provider instance id the row the manager made at rent time is
-- taken over (it becomes idle, ready); without one a new row is made. Answers the instance id.
create function gpuq.register_instance(
    p_provider             text,
    p_provider_instance_id text default null,
    p_gpu_name             text default null,
    p_gpu_count            integer default null,
    p_vram_mb              integer default null,
    p_queues               text[] default '{}',
    p_backends             text[] default '{}',
    p_max_concurrency      integer default 1,
    p_version              text default null,
    p_hostname             text default null
) returns bigint
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    v_id bigint;
begin
    insert into gpuq.instances as i (provider, provider_instance_id, status, gpu_name, gpu_count, vram_mb,
                                     queues, backends, max_concurrency, version, hostname, ready_at,
                                     last_heartbeat_at)
    values (p_provider, p_provider_instance_id, 'idle', p_gpu_name, p_gpu_count, p_vram_mb,
            coalesce(p_queues, '{}'), coalesce(p_backends, '{}'), p_max_concurrency, p_version, p_hostname,
            now(), now())
    on conflict (provider, provider_instance_id) do update
       set status = case when i.status in ('requested', 'booting', 'idle', 'busy')
                         then 'idle'::gpuq.instance_status else i.status end,
           gpu_name = coalesce(excluded.gpu_name, i.gpu_name),
           gpu_count = coalesce(excluded.gpu_count, i.gpu_count),
           vram_mb = coalesce(excluded.vram_mb, i.vram_mb),
           queues = excluded.queues, backends = excluded.backends,
           max_concurrency = excluded.max_concurrency, version = excluded.version,
           hostname = excluded.hostname, ready_at = coalesce(i.ready_at, now()), last_heartbeat_at = now()
    returning id into v_id;
    insert into gpuq.instance_events (instance_id, event, status, message)
    values (v_id, 'registered', 'idle', format('worker %s on %s serves %s', p_version, p_hostname, p_queues));
    return v_id;
end $$;

-- A worker asks for (or the manager orders) a drain: claim nothing more, finish or release what runs.
create function gpuq.drain_instance(p_instance_id bigint, p_reason text default null) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    update gpuq.instances set status = 'draining'
     where id = p_instance_id and status in ('requested', 'booting', 'idle', 'busy');
    if found then
        insert into gpuq.instance_events (instance_id, event, status, message)
        values (p_instance_id, 'draining', 'draining', p_reason);
    elsif not exists (select 1 from gpuq.instances where id = p_instance_id) then
        raise exception using errcode = 'GQ404', message = format('instance %s does not exist', p_instance_id);
    end if;
end $$;

-- A worker exiting: hands back anything it still holds and marks the instance terminated. For a rented
-- machine the manager still destroys it (reconciliation treats a terminated row still billing as an orphan).
create function gpuq.deregister_instance(p_instance_id bigint, p_reason text default 'worker exited')
returns integer
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    n integer;
begin
    n := gpuq.release_jobs(p_instance_id, null);
    update gpuq.instances
       set status = 'terminated', terminated_at = coalesce(terminated_at, now()),
           end_reason = coalesce(end_reason, p_reason)
     where id = p_instance_id and status not in ('terminated', 'failed', 'lost');
    if found then
        insert into gpuq.instance_events (instance_id, event, status, message)
        values (p_instance_id, 'deregistered', 'terminated', p_reason);
    end if;
    return n;
end $$;

---------------------------------------------------------------------------------------------------
-- Reading: history and stats, for operators in a SQL editor and for the CLI.

-- What happened to a job: each ended attempt and event, on which instance, and what it cost
-- (attempt run time x the instance's $/h). The attempt now running, or the one that succeeded, comes last.
create function gpuq.job_history(p_job_id bigint)
returns table (attempt integer, event text, at timestamptz, instance_id bigint, provider text, gpu_name text,
               started_at timestamptz, run_seconds double precision, cost_usd numeric, error_code text,
               message text, details jsonb)
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    select e.attempt, e.event, e.at, e.instance_id, i.provider, i.gpu_name, e.started_at,
           extract(epoch from e.at - e.started_at)::double precision,
           round(extract(epoch from e.at - e.started_at) / 3600 * i.dph, 6),
           e.error_code, e.message, e.details
      from gpuq.job_events e left join gpuq.instances i on i.id = e.instance_id
     where e.job_id = p_job_id
    union all
    select j.attempt, 'running', now(), j.instance_id, i.provider, i.gpu_name, j.started_at,
           extract(epoch from now() - j.started_at)::double precision,
           round(extract(epoch from now() - j.started_at) / 3600 * i.dph, 6),
           null, j.progress_message, null
      from gpuq.jobs j left join gpuq.instances i on i.id = j.instance_id
     where j.id = p_job_id and j.status = 'running'
    union all
    select j.attempt, 'succeeded', j.finished_at, j.instance_id, i.provider, i.gpu_name, j.started_at,
           extract(epoch from j.finished_at - j.started_at)::double precision,
           round(extract(epoch from j.finished_at - j.started_at) / 3600 * i.dph, 6),
           null, null, null
      from gpuq.jobs j left join gpuq.instances i on i.id = j.instance_id
     where j.id = p_job_id and j.status = 'succeeded'
    order by 3, 1
$$;

-- Per queue: depth, age, outcomes in the last hour and day, wait and run-time percentiles (last hour),
-- and throughput (succeeded per minute over the last hour).
create function gpuq.queue_stats()
returns table (queue text, queued bigint, scheduled bigint, running bigint, oldest_wait interval,
               succeeded_1h bigint, failed_1h bigint, succeeded_24h bigint, failed_24h bigint,
               cancelled_24h bigint, wait_p50 interval, wait_p95 interval, run_p50 interval,
               run_p95 interval, per_minute_1h numeric)
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    with live as (
        select j.queue,
               count(*) filter (where j.status = 'queued' and j.run_after <= now()) as queued,
               count(*) filter (where j.status = 'queued' and j.run_after > now()) as scheduled,
               count(*) filter (where j.status = 'running') as running,
               now() - min(greatest(j.run_after, j.created_at)) filter (where j.status = 'queued'
                                                                         and j.run_after <= now()) as oldest_wait
          from gpuq.jobs j
         where j.status in ('queued', 'running')
         group by j.queue
    ), done as (
        select j.queue,
               count(*) filter (where j.status = 'succeeded' and j.finished_at > now() - interval '1 hour') as s1,
               count(*) filter (where j.status = 'failed' and j.finished_at > now() - interval '1 hour') as f1,
               count(*) filter (where j.status = 'succeeded') as s24,
               count(*) filter (where j.status = 'failed') as f24,
               count(*) filter (where j.status = 'cancelled') as c24,
               percentile_cont(0.5) within group (order by j.finished_at - j.started_at)
                   filter (where j.status = 'succeeded' and j.finished_at > now() - interval '1 hour') as run_p50,
               percentile_cont(0.95) within group (order by j.finished_at - j.started_at)
                   filter (where j.status = 'succeeded' and j.finished_at > now() - interval '1 hour') as run_p95
          from gpuq.jobs j
         where j.finished_at > now() - interval '24 hours'
         group by j.queue
    ), waits as (
        select j.queue,
               percentile_cont(0.5) within group (order by j.started_at - greatest(j.run_after, j.created_at)) as p50,
               percentile_cont(0.95) within group (order by j.started_at - greatest(j.run_after, j.created_at)) as p95
          from gpuq.jobs j
         where j.started_at > now() - interval '1 hour'
           and (j.finished_at > now() - interval '1 hour' or j.status = 'running')  -- index-backed
         group by j.queue
    ), queues as (
        select live.queue from live union select done.queue from done union select waits.queue from waits
    )
    select q.queue, coalesce(l.queued, 0), coalesce(l.scheduled, 0), coalesce(l.running, 0), l.oldest_wait,
           coalesce(d.s1, 0), coalesce(d.f1, 0), coalesce(d.s24, 0), coalesce(d.f24, 0), coalesce(d.c24, 0),
           w.p50, w.p95, d.run_p50, d.run_p95, round(coalesce(d.s1, 0) / 60.0, 2)
      from queues q
      left join live l on l.queue = q.queue
      left join done d on d.queue = q.queue
      left join waits w on w.queue = q.queue
     order by q.queue
$$;

-- Per provider: instances by status, $/h burning now, and spend today (in p_tz, default UTC), from each
-- instance's $/h over the part of today it was rented.
create function gpuq.instance_stats(p_tz text default 'UTC')
returns table (provider text, requested bigint, booting bigint, idle bigint, busy bigint, draining bigint,
               live bigint, ended_today bigint, dph_now numeric, spend_today_usd numeric)
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    with day as (
        select (date_trunc('day', now() at time zone p_tz)) at time zone p_tz as start
    )
    select i.provider,
           count(*) filter (where i.status = 'requested'),
           count(*) filter (where i.status = 'booting'),
           count(*) filter (where i.status = 'idle'),
           count(*) filter (where i.status = 'busy'),
           count(*) filter (where i.status = 'draining'),
           count(*) filter (where i.terminated_at is null),
           count(*) filter (where i.terminated_at >= day.start),
           coalesce(sum(i.dph) filter (where i.terminated_at is null), 0),
           round(coalesce(sum(i.dph * extract(epoch from coalesce(i.terminated_at, now())
                                                    - greatest(i.created_at, day.start)) / 3600), 0), 4)
      from gpuq.instances i, day
     where i.terminated_at is null or i.terminated_at >= day.start
     group by i.provider
     order by i.provider
$$;

-- Failures by error code since now() - p_since: final failures and retried attempts, with an example.
create function gpuq.failure_stats(p_since interval default '24 hours')
returns table (error_code text, retryable boolean, failed bigint, retried bigint, lease_expired bigint,
               queues text[], last_at timestamptz, last_message text)
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    select e.error_code, c.retryable,
           count(*) filter (where e.event = 'failed'),
           count(*) filter (where e.event = 'retry_scheduled'),
           count(*) filter (where e.event = 'lease_expired'),
           array_agg(distinct j.queue),
           max(e.at),
           (array_agg(e.message order by e.at desc))[1]
      from gpuq.job_events e
      join gpuq.jobs j on j.id = e.job_id
      left join gpuq.error_codes c on c.code = e.error_code
     where e.at > now() - p_since and e.error_code is not null and e.event <> 'cancelled'
     group by e.error_code, c.retryable
     order by count(*) desc
$$;

---------------------------------------------------------------------------------------------------
-- Access. Nothing is reachable by default (functions are executable by PUBLIC unless revoked);
-- gpuq_worker may run the worker functions only; gpuq_app may enqueue, read and cancel jobs.
-- Row level security is on everywhere, so Supabase's anon/authenticated roles see nothing even if a
-- grant slips in; the functions are SECURITY DEFINER and run as the owner.

alter table gpuq.jobs enable row level security;
alter table gpuq.job_events enable row level security;
alter table gpuq.instances enable row level security;
alter table gpuq.instance_events enable row level security;
alter table gpuq.error_codes enable row level security;
alter table gpuq.queue_settings enable row level security;

revoke all on schema gpuq from public;
revoke all on all tables in schema gpuq from public;
revoke all on all sequences in schema gpuq from public;
revoke execute on all functions in schema gpuq from public;
alter default privileges in schema gpuq revoke execute on functions from public;

do $$
declare
    r text;
begin
    foreach r in array array['gpuq_worker', 'gpuq_app'] loop
        if not exists (select 1 from pg_roles where rolname = r) then
            begin
                execute format('create role %I nologin', r);
            exception when insufficient_privilege then
                raise notice 'gpuq: could not create role % (needs CREATEROLE); grant it by hand later', r;
            end;
        end if;
    end loop;
    foreach r in array array['anon', 'authenticated'] loop  -- Supabase's API roles, where they exist
        if exists (select 1 from pg_roles where rolname = r) then
            execute format('revoke all on schema gpuq from %I', r);
            execute format('revoke all on all tables in schema gpuq from %I', r);
            execute format('revoke execute on all functions in schema gpuq from %I', r);
        end if;
    end loop;

    if exists (select 1 from pg_roles where rolname = 'gpuq_worker') then
        grant usage on schema gpuq to gpuq_worker;
        grant execute on function
            gpuq.claim_jobs(bigint, text[], integer, integer, integer),
            gpuq.heartbeat(bigint, bigint[], integer[], jsonb, integer),
            gpuq.report_progress(bigint, integer, integer, text),
            gpuq.complete_job(bigint, integer, jsonb),
            gpuq.complete_jobs(bigint[], integer[], jsonb[]),
            gpuq.fail_job(bigint, integer, text, text, boolean, jsonb),
            gpuq.release_jobs(bigint, bigint[]),
            gpuq.register_instance(text, text, text, integer, integer, text[], text[], integer, text, text),
            gpuq.drain_instance(bigint, text),
            gpuq.deregister_instance(bigint, text)
        to gpuq_worker;
    end if;

    if exists (select 1 from pg_roles where rolname = 'gpuq_app') then
        grant usage on schema gpuq to gpuq_app;
        grant select on gpuq.jobs to gpuq_app;
        grant insert (queue, payload, priority, run_after, max_attempts, timeout_seconds, min_vram_mb,
                      idempotency_key) on gpuq.jobs to gpuq_app;
        grant execute on function
            gpuq.enqueue(text, jsonb, integer, timestamptz, integer, integer, integer, text),
            gpuq.cancel_job(bigint),
            gpuq.job_history(bigint),
            gpuq.queue_stats()
        to gpuq_app;
        execute 'create policy app_reads_jobs on gpuq.jobs for select to gpuq_app using (true)';
        execute 'create policy app_inserts_jobs on gpuq.jobs for insert to gpuq_app with check (true)';
    end if;
end $$;
