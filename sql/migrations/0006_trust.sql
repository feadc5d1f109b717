-- gpuq 0006: rented hosts are strangers. A worker acts as one instance, proven by that instance's secret,
-- and only on the jobs it holds, proven by each claim's random lease token.
--
-- Before this, every worker shared the gpuq_worker login and the worker functions trusted the instance id
-- and (job, attempt) they were given: a host could complete, fail or heartbeat another host's jobs (ids are
-- sequential, attempts 1..3), claim every queue with an unbounded lease, rewrite another instance's row,
-- and keep working after its instance was destroyed.
--
-- Now:
-- * Instance secrets. The manager mints a random secret per instance it rents (`gpuq enroll` does it for a
--   hand-started worker) and stores only its sha256 (record_rent, enroll_instance). Every worker function
--   takes that secret first and acts for its instance only. A secret stops working when its instance
--   ends (terminated, failed, lost: a trigger clears the hash), when the worker deregisters, or at its expiry.
--   register_instance may replace it with one the worker made (only the hash travels), so the secret the
--   host was started with is dead once the worker has registered.
-- * The manager owns the instance row: queues, GPU, VRAM, provider, label and capacity. A worker reports
--   its GPU and VRAM (kept apart, reported_*); it can lower what it claims, never raise it.
-- * A claim serves only the instance's queues and VRAM, takes at most its free capacity
--   (max_concurrency minus what it runs), and issues a random lease token per job. progress, complete, fail
--   and release need the instance's secret and that token; a refusal says nothing about the job.
-- * Leases are clamped (gpuq.config: 10..600 s by default) and never run past the job's timeout plus a
--   grace, and a cancel caps the lease at a grace: the server ends such jobs whoever holds them.
-- * heartbeat extends only the (job, token) pairs named; a job the instance holds but did not name goes
--   back to the queue at once (a claim whose reply was lost, a worker that restarted).
-- * A job whose holder is gone keeps its place in line (run_after is left as it was).
-- * complete and fail are idempotent for the token that made them, so a worker may retry one whose reply
--   was lost.
-- * Backoff reads gpuq.config (owner only), not the caller's session settings.
-- * Named constraints cap payload, result, message, details and metrics sizes.
-- SQLSTATE GQ401: the instance secret is unknown, expired or revoked.

---------------------------------------------------------------------------------------------------
-- Settings an operator may change (as the owner): update gpuq.config set retry_base_seconds = 30;

create table gpuq.config (
    singleton             boolean primary key default true check (singleton),
    retry_base_seconds    double precision not null default 10
        constraint retry_base_seconds_must_be_between_0_1_and_3600 check (retry_base_seconds between 0.1 and 3600),
    retry_max_seconds     double precision not null default 3600
        constraint retry_max_seconds_must_be_between_1_and_86400 check (retry_max_seconds between 1 and 86400),
    min_lease_seconds     integer not null default 10
        constraint min_lease_seconds_must_be_between_1_and_600 check (min_lease_seconds between 1 and 600),
    max_lease_seconds     integer not null default 600
        constraint max_lease_seconds_must_be_between_10_and_3600 check (max_lease_seconds between 10 and 3600),
    -- how long past its timeout a job may run before the server ends it (its worker should have)
    timeout_grace_seconds integer not null default 60
        constraint timeout_grace_seconds_must_be_between_1_and_3600 check (timeout_grace_seconds between 1 and 3600),
    -- how long a cancelled running job may take to stop before the server ends it
    cancel_grace_seconds  integer not null default 60
        constraint cancel_grace_seconds_must_be_between_1_and_3600 check (cancel_grace_seconds between 1 and 3600),
    constraint min_lease_must_not_exceed_max_lease check (min_lease_seconds <= max_lease_seconds)
);
insert into gpuq.config default values;
alter table gpuq.config enable row level security;

---------------------------------------------------------------------------------------------------
-- Columns, indexes, constraints.

alter table gpuq.instances
    add column secret_sha256     bytea,
    add column secret_expires_at timestamptz,
    add column reported_gpu_name text,
    add column reported_vram_mb  integer,
    add constraint secret_sha256_must_be_32_bytes check (octet_length(secret_sha256) = 32),
    -- NOT VALID: rows written before these limits stay; every new or changed row is held to them
    add constraint max_concurrency_must_be_between_1_and_4096
        check (max_concurrency between 1 and 4096) not valid,
    add constraint metrics_must_be_at_most_16_kib check (pg_column_size(metrics) <= 16384) not valid,
    add constraint hostname_must_be_at_most_255_characters check (char_length(hostname) <= 255) not valid,
    add constraint version_must_be_at_most_100_characters check (char_length(version) <= 100) not valid,
    add constraint reported_gpu_name_must_be_at_most_200_characters
        check (char_length(reported_gpu_name) <= 200);
create unique index instances_secret_idx on gpuq.instances (secret_sha256) where secret_sha256 is not null;

alter table gpuq.instance_events
    add constraint message_must_be_at_most_2000_characters check (char_length(message) <= 2000) not valid;

alter table gpuq.jobs
    add column lease_token uuid,
    add constraint payload_must_be_at_most_1_mib check (pg_column_size(payload) <= 1048576) not valid,
    add constraint result_must_be_at_most_64_kib check (pg_column_size(result) <= 65536) not valid,
    add constraint error_message_must_be_at_most_2000_characters
        check (char_length(error_message) <= 2000) not valid,
    add constraint progress_message_must_be_at_most_500_characters
        check (char_length(progress_message) <= 500) not valid;
-- Jobs running on one instance: claims count them (free capacity), heartbeats list them.
create index jobs_running_instance_idx on gpuq.jobs (instance_id) where status = 'running';
-- Running jobs from before this migration get a token, so that the functions below can end them.
update gpuq.jobs set lease_token = gen_random_uuid() where status = 'running';

alter table gpuq.job_events
    add constraint message_must_be_at_most_2000_characters check (char_length(message) <= 2000) not valid,
    add constraint details_must_be_at_most_64_kib check (pg_column_size(details) <= 65536) not valid;

-- A new job starts clean: no lease token either.
create or replace function gpuq._check_new_job() returns trigger
language plpgsql as $$
begin
    if new.status <> 'queued' or new.attempt <> 0 or new.releases <> 0 or new.instance_id is not null
       or new.lease_expires_at is not null or new.started_at is not null or new.finished_at is not null
       or new.cancel_requested_at is not null or new.progress is not null or new.result is not null
       or new.error_code is not null or new.error_message is not null or new.lease_token is not null then
        raise exception using
            errcode = '23514',
            message = 'a new job must start queued and clean',
            hint = 'insert only queue, payload, priority, run_after, max_attempts, timeout_seconds, '
                   'min_vram_mb and idempotency_key; the rest is set by gpuq''s functions';
    end if;
    return new;
end $$;

-- An instance that ended (terminated, failed, lost) loses its secret, whichever function ended it.
create function gpuq._revoke_ended_secret() returns trigger
language plpgsql as $$
begin
    new.secret_sha256 := null;
    return new;
end $$;

create trigger instances_revoke_ended_secret before insert or update on gpuq.instances
    for each row when (new.secret_sha256 is not null and new.status in ('terminated', 'failed', 'lost'))
    execute function gpuq._revoke_ended_secret();

---------------------------------------------------------------------------------------------------
-- Internals.

-- The live instance whose secret this is, or GQ401. The same answer for an unknown, expired or revoked
-- secret: a caller learns nothing from it.
create function gpuq._instance_for(p_secret text) returns gpuq.instances
language plpgsql stable as $$
declare
    i gpuq.instances;
begin
    if p_secret is not null and octet_length(p_secret) between 16 and 256 then
        select * into i from gpuq.instances
         where secret_sha256 = sha256(convert_to(p_secret, 'UTF8'))
           and (secret_expires_at is null or secret_expires_at > now());
    end if;
    if i.id is null then
        raise exception using errcode = 'GQ401', message = 'the instance secret is unknown, expired or revoked';
    end if;
    return i;
end $$;

create function gpuq._not_held(p_job_id bigint) returns void
language plpgsql as $$
begin
    raise exception using
        errcode = 'GQ409',
        message = format('job %s is not held by this instance under that lease token', p_job_id);
end $$;

-- A lease of p_seconds, clamped to gpuq.config's bounds; a negative or missing one is refused.
create function gpuq._lease(p_seconds integer) returns interval
language plpgsql stable as $$
declare
    c gpuq.config;
begin
    if p_seconds is null or p_seconds < 1 then
        raise exception using errcode = 'GQ400', message = 'a lease must be at least 1 second';
    end if;
    select * into c from gpuq.config;
    return make_interval(secs => least(greatest(p_seconds, c.min_lease_seconds), c.max_lease_seconds));
end $$;

-- When a running job's lease must end at the latest: its timeout plus the grace.
create function gpuq._lease_cap(p_started_at timestamptz, p_timeout_seconds integer) returns timestamptz
language sql stable as $$
    select p_started_at + make_interval(secs => p_timeout_seconds + c.timeout_grace_seconds) from gpuq.config c
$$;

-- Backoff with equal jitter: attempt n waits between d/2 and d, d = min(base * 2^(n-1), max), from
-- gpuq.config (no caller's session setting changes it).
create or replace function gpuq.retry_delay(p_attempts_used integer) returns interval
language sql volatile as $$
    select make_interval(secs => d / 2 + random() * d / 2)
      from (select least(c.retry_max_seconds, c.retry_base_seconds * power(2, least(greatest(p_attempts_used, 1), 40) - 1))
                   as d
              from gpuq.config c) as x
$$;

-- End the current attempt of running jobs whose holder is gone (the lease expired, its instance's
-- heartbeat did not name it, its worker restarted, its instance ended). The caller has locked the rows.
--   cancel requested            -> cancelled
--   past its timeout            -> TIMEOUT: queued after a backoff while attempts remain, else failed
--   otherwise                   -> queued again at its old place in line (LEASE_EXPIRED), or failed when
--                                  no attempt is left
-- Answers how many jobs it ended or queued again.
create function gpuq._end_attempts(p_job_ids bigint[], p_message text) returns integer
language plpgsql as $$
declare
    n integer;
begin
    with held as (  -- who held each: the event names the instance whose attempt ended
        select id, instance_id from gpuq.jobs where id = any (p_job_ids) and status = 'running'
    ), ended as (
        update gpuq.jobs j
           set status = case when j.cancel_requested_at is not null then 'cancelled'
                             when j.attempt - j.releases >= j.max_attempts then 'failed'
                             else 'queued' end::gpuq.job_status,
               error_code = case when j.cancel_requested_at is not null then 'CANCELLED'
                                 when j.started_at + make_interval(secs => j.timeout_seconds) <= now() then 'TIMEOUT'
                                 else 'LEASE_EXPIRED' end,
               error_message = case
                   when j.cancel_requested_at is not null then 'cancelled while its worker was unreachable'
                   when j.started_at + make_interval(secs => j.timeout_seconds) <= now()
                       then format('ran past its timeout of %s s and its worker did not stop it', j.timeout_seconds)
                   when j.attempt - j.releases >= j.max_attempts
                       then format('%s, and all %s attempts are used', p_message, j.max_attempts)
                   else p_message end,
               run_after = case
                   when j.cancel_requested_at is null and j.attempt - j.releases < j.max_attempts
                        and j.started_at + make_interval(secs => j.timeout_seconds) <= now()
                       then now() + gpuq.retry_delay(j.attempt - j.releases)
                   else j.run_after end,  -- a job whose holder vanished keeps its place in line
               finished_at = case when j.cancel_requested_at is not null or j.attempt - j.releases >= j.max_attempts
                                  then now() end,
               instance_id = case when j.cancel_requested_at is not null or j.attempt - j.releases >= j.max_attempts
                                  then j.instance_id end,
               lease_expires_at = null, lease_token = null
          from held
         where j.id = held.id and j.status = 'running'
        returning j.id, j.attempt, j.status, j.queue, j.started_at, j.error_code, j.error_message,
                  held.instance_id as held_by
    ), logged as (
        insert into gpuq.job_events (job_id, attempt, event, instance_id, started_at, error_code, message)
        select id, attempt,
               case when status = 'cancelled' then 'cancelled'
                    when error_code = 'TIMEOUT' then
                        case when status = 'queued' then 'retry_scheduled' else 'failed' end
                    else 'lease_expired' end,
               held_by, started_at, error_code, error_message
          from ended
    )
    select count(*) into n
      from (select case when status = 'queued' then pg_notify('gpuq_jobs', queue)
                        else gpuq._notify_finished(id, status, queue) end
              from ended) as x;
    return n;
end $$;

-- Running jobs of p_queues (null: all) whose lease expired: their attempt ends (_end_attempts). Rows
-- another transaction holds are skipped: a claim or a heartbeat is dealing with them.
create function gpuq._reap_expired(p_queues text[]) returns integer
language plpgsql as $$
begin
    return gpuq._end_attempts(
        array(select id from gpuq.jobs
               where status = 'running' and lease_expires_at < now()
                 and (p_queues is null or queue = any (p_queues))
               order by id
               for update skip locked),
        'the worker went silent; queued again');
end $$;

-- called from claim_jobs, whose generic plan setting must not reach these (as 0004 did for their forerunners)
alter function gpuq._reap_expired(text[]) set plan_cache_mode = auto;
alter function gpuq._end_attempts(bigint[], text) set plan_cache_mode = auto;

create or replace function gpuq.reap_expired() returns integer
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    return gpuq._reap_expired(null);
end $$;

-- Hand an instance's running jobs back (p_job_ids null: all of them): a job whose cancellation was
-- requested ends cancelled; the others are queued again at their old place, no attempt used up. The
-- manager's destroy and the worker's own release both come here. Answers how many went back.
create function gpuq._release(p_instance_id bigint, p_job_ids bigint[], p_message text) returns integer
language plpgsql as $$
declare
    n integer;
begin
    with ended as (
        update gpuq.jobs j
           set status = 'cancelled', finished_at = now(), lease_expires_at = null, lease_token = null,
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
           set status = 'queued', releases = j.releases + 1, lease_expires_at = null, lease_token = null,
               instance_id = null, progress = null, progress_message = null
         where j.instance_id = p_instance_id and j.status = 'running'
           and (p_job_ids is null or j.id = any (p_job_ids))
        returning j.id, j.attempt, j.queue, j.started_at
    ), logged as (
        insert into gpuq.job_events (job_id, attempt, event, instance_id, started_at, message)
        select id, attempt, 'released', p_instance_id, started_at, p_message from released
    )
    select count(*) into n from (select pg_notify('gpuq_jobs', queue) from released) as x;
    return n;
end $$;

---------------------------------------------------------------------------------------------------
-- The old worker functions, which trusted the instance id and (job, attempt) they were given.

drop function gpuq.claim_jobs(bigint, text[], integer, integer, integer);
drop function gpuq.heartbeat(bigint, bigint[], integer[], jsonb, integer);
drop function gpuq.report_progress(bigint, integer, integer, text);
drop function gpuq.complete_job(bigint, integer, jsonb);
drop function gpuq.complete_jobs(bigint[], integer[], jsonb[]);
drop function gpuq.fail_job(bigint, integer, text, text, boolean, jsonb);
drop function gpuq.register_instance(text, text, text, integer, integer, text[], text[], integer, text, text);
drop function gpuq.deregister_instance(bigint, text);
drop function gpuq.manager_silence_seconds();
drop function gpuq.record_rent(text, text, text, text, text, text, integer, integer, numeric, boolean, text[], text);
drop function gpuq._job_not_held(bigint, integer);
drop function gpuq._end_expired(text[]);  -- both replaced by _reap_expired
drop function gpuq._requeue_expired(text[]);
-- (release_jobs(bigint, bigint[]) is dropped below, once nothing calls it.)

---------------------------------------------------------------------------------------------------
-- The manager's side: minting instances (rented or enrolled) and ending them.

-- A rent the provider answered: a 'requested' row, its price, what it serves, and the hash of the secret
-- the manager gave it. Answers the row's id.
create function gpuq.record_rent(
    p_provider             text,
    p_provider_instance_id text,
    p_offer_id             text,
    p_machine_id           text,
    p_label                text,
    p_gpu_name             text,
    p_gpu_count            integer,
    p_vram_mb              integer,
    p_dph                  numeric,
    p_interruptible        boolean,
    p_queues               text[],
    p_reason               text default null,
    p_max_concurrency      integer default 1,
    p_secret_sha256        bytea default null
) returns bigint
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    v_id bigint;
begin
    if p_provider_instance_id is null or p_dph is null then
        raise exception using errcode = 'GQ400', message = 'a rent needs a provider instance id and a price';
    end if;
    insert into gpuq.instances (provider, provider_instance_id, offer_id, machine_id, label, status, gpu_name,
                                gpu_count, vram_mb, dph, interruptible, queues, max_concurrency, secret_sha256)
    values (p_provider, p_provider_instance_id, p_offer_id, p_machine_id, p_label, 'requested', p_gpu_name,
            p_gpu_count, p_vram_mb, p_dph, p_interruptible, coalesce(p_queues, '{}'),
            coalesce(p_max_concurrency, 1), p_secret_sha256)
    returning id into v_id;
    insert into gpuq.instance_events (instance_id, event, status, dph, message, details)
    values (v_id, 'rented', 'requested', p_dph, p_reason,
            jsonb_build_object('offer_id', p_offer_id, 'machine_id', p_machine_id, 'label', p_label));
    return v_id;
end $$;

-- An instance for a worker started by hand (`gpuq enroll`): a 'requested' row serving p_queues, with the
-- hash of the secret the operator hands to that worker, valid for p_valid_for (null: until it ends).
create function gpuq.enroll_instance(
    p_secret_sha256   bytea,
    p_queues          text[],
    p_max_concurrency integer default 1,
    p_vram_mb         integer default 0,
    p_gpu_name        text default null,
    p_provider        text default 'manual',
    p_valid_for       interval default null,
    p_label           text default null
) returns bigint
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    v_id bigint;
begin
    if cardinality(p_queues) is null or cardinality(p_queues) = 0 then
        raise exception using errcode = 'GQ400', message = 'an enrolled instance must serve at least one queue';
    end if;
    if p_valid_for is not null and p_valid_for <= interval '0' then
        raise exception using errcode = 'GQ400', message = 'an enrolment must be valid for a positive time';
    end if;
    if exists (select 1 from unnest(p_queues) q
                where q is null or octet_length(q) not between 1 and 63
                   or ltrim(q, '0123456789abcdefghijklmnopqrstuvwxyz_.-') <> '' or left(q, 1) in ('_', '.', '-')) then
        raise exception using errcode = 'GQ400',
            message = format('queue names are lowercase, digits, _ . - (got %s)', p_queues);
    end if;
    insert into gpuq.instances (provider, label, status, gpu_name, vram_mb, queues, max_concurrency, secret_sha256,
                                secret_expires_at)
    values (coalesce(p_provider, 'manual'), p_label, 'requested', p_gpu_name, coalesce(p_vram_mb, 0), p_queues,
            coalesce(p_max_concurrency, 1), p_secret_sha256, now() + p_valid_for)
    returning id into v_id;
    insert into gpuq.instance_events (instance_id, event, status, message)
    values (v_id, 'enrolled', 'requested', format('serves %s', p_queues));
    return v_id;
end $$;

-- An operator ends an instance by hand (`gpuq revoke`): its secret stops working at once and its jobs go
-- back to the queue. For a rented machine the manager still destroys it (it is no longer live).
create function gpuq.revoke_instance(p_instance_id bigint, p_reason text default 'revoked by an operator')
returns integer
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    n integer;
begin
    perform 1 from gpuq.instances where id = p_instance_id for update;
    if not found then
        raise exception using errcode = 'GQ404', message = format('instance %s does not exist', p_instance_id);
    end if;
    n := gpuq._release(p_instance_id, null, 'handed back: its instance was revoked');
    update gpuq.instances
       set status = case when status in ('terminated', 'lost') then status else 'failed' end::gpuq.instance_status,
           secret_sha256 = null, end_reason = coalesce(end_reason, left(p_reason, 2000))
     where id = p_instance_id;
    insert into gpuq.instance_events (instance_id, event, message, details)
    values (p_instance_id, 'revoked', left(p_reason, 2000), jsonb_build_object('released_jobs', n));
    return n;
end $$;

-- The manager hands back every job an instance holds (before destroying it).
create function gpuq.release_instance_jobs(p_instance_id bigint) returns integer
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    return gpuq._release(p_instance_id, null, 'handed back: its instance is being destroyed');
end $$;

create or replace function gpuq.mark_failed(p_instance_id bigint, p_reason text) returns integer
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    n integer;
begin
    n := gpuq._release(p_instance_id, null, 'handed back: its instance failed');
    update gpuq.instances set status = 'failed', end_reason = coalesce(end_reason, p_reason)
     where id = p_instance_id and status in ('requested', 'booting', 'idle', 'busy', 'draining');
    if found then
        insert into gpuq.instance_events (instance_id, event, status, message, details)
        values (p_instance_id, 'failed', 'failed', left(p_reason, 2000), jsonb_build_object('released_jobs', n));
    end if;
    return n;
end $$;

create or replace function gpuq.mark_lost(p_instance_id bigint, p_reason text default 'the provider no longer shows it')
returns integer
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    n integer;
    v_dph numeric;
begin
    n := gpuq._release(p_instance_id, null, 'handed back: its instance was lost');
    update gpuq.instances
       set status = case when status = 'failed' then status else 'lost' end,
           terminated_at = now(), end_reason = coalesce(end_reason, p_reason)
     where id = p_instance_id and terminated_at is null
    returning dph into v_dph;
    if found then
        insert into gpuq.instance_events (instance_id, event, status, dph, message, details)
        values (p_instance_id, 'lost', 'lost', v_dph, left(p_reason, 2000), jsonb_build_object('released_jobs', n));
    end if;
    return n;
end $$;

create or replace function gpuq.record_destroy(
    p_instance_id  bigint,
    p_reason       text,
    p_release_jobs boolean default true,
    p_at           timestamptz default null
) returns integer
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    n integer := 0;
    v_dph numeric;
    v_status gpuq.instance_status;
begin
    if p_release_jobs then
        n := gpuq._release(p_instance_id, null, 'handed back: its instance was destroyed');
    end if;
    update gpuq.instances
       set status = case when status in ('requested', 'booting') then 'failed'
                         when status in ('failed', 'lost') then status
                         else 'terminated' end::gpuq.instance_status,
           terminated_at = case when status = 'lost' then terminated_at else coalesce(p_at, now()) end,
           end_reason = case when status in ('failed', 'lost') then coalesce(end_reason, p_reason)
                             else p_reason end,
           secret_sha256 = null
     where id = p_instance_id
    returning dph, status into v_dph, v_status;
    if not found then
        raise exception using errcode = 'GQ404', message = format('instance %s does not exist', p_instance_id);
    end if;
    -- jobs still marked running on it (p_release_jobs false, or a race) end now: nobody can report them
    perform gpuq._end_attempts(array(select id from gpuq.jobs
                                      where instance_id = p_instance_id and status = 'running'
                                      order by id for update),
                               'its instance was destroyed; queued again');
    insert into gpuq.instance_events (instance_id, at, event, status, dph, message, details)
    values (p_instance_id, coalesce(p_at, now()), 'destroyed', v_status, v_dph, left(p_reason, 2000),
            jsonb_build_object('released_jobs', n));
    return n;
end $$;

drop function gpuq.release_jobs(bigint, bigint[]);

-- Cancel: a queued job ends at once; a running one is asked to stop through its worker's heartbeat, and
-- its lease is cut to the cancel grace, so the server ends it if the worker does not.
create or replace function gpuq.cancel_job(p_job_id bigint) returns gpuq.job_status
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
        update gpuq.jobs
           set cancel_requested_at = now(),
               lease_expires_at = least(lease_expires_at,
                                        now() + make_interval(secs => (select cancel_grace_seconds from gpuq.config)))
         where id = p_job_id;
        insert into gpuq.job_events (job_id, attempt, event, instance_id)
        values (p_job_id, j.attempt, 'cancel_requested', j.instance_id);
    end if;
    return j.status;
end $$;

---------------------------------------------------------------------------------------------------
-- The worker's side. Each function takes the instance's secret first and acts for that instance only.

-- A worker starting: the instance becomes ready (idle), its reported GPU is noted, jobs an earlier worker
-- process of this instance held go back to the queue (nobody works on them now), and, with
-- p_new_secret_sha256, the secret is replaced by one the worker made (the one it was started with is then
-- dead). Answers what the manager set: what the instance serves, with how many jobs at once, and the
-- lease bounds.
create function gpuq.register_instance(
    p_secret            text,
    p_gpu_name          text default null,
    p_gpu_count         integer default null,
    p_vram_mb           integer default null,
    p_version           text default null,
    p_hostname          text default null,
    p_new_secret_sha256 bytea default null
) returns table (instance_id bigint, provider text, queues text[], max_concurrency integer, vram_mb integer,
                 min_lease_seconds integer, max_lease_seconds integer)
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    i gpuq.instances;
    n integer;
    v_status gpuq.instance_status;
begin
    i := gpuq._instance_for(p_secret);
    if p_new_secret_sha256 is not null and octet_length(p_new_secret_sha256) <> 32 then
        raise exception using errcode = 'GQ400', message = 'a new secret''s hash must be a 32-byte sha256';
    end if;
    perform 1 from gpuq.instances where id = i.id for no key update;
    n := gpuq._end_attempts(array(select j.id from gpuq.jobs j
                                   where j.instance_id = i.id and j.status = 'running' order by j.id for update),
                            'its worker restarted; queued again');
    update gpuq.instances as r
       set status = case when r.status in ('requested', 'booting', 'busy') then 'idle'::gpuq.instance_status
                         else r.status end,
           reported_gpu_name = left(p_gpu_name, 200),
           reported_vram_mb = p_vram_mb,
           gpu_count = coalesce(r.gpu_count, p_gpu_count),
           version = left(p_version, 100),
           hostname = left(p_hostname, 255),
           ready_at = coalesce(r.ready_at, now()),
           last_heartbeat_at = now(),
           secret_sha256 = coalesce(p_new_secret_sha256, r.secret_sha256)
     where r.id = i.id
    returning r.status into v_status;
    insert into gpuq.instance_events (instance_id, event, status, message, details)
    values (i.id, 'registered', v_status,
            left(format('worker %s on %s serves %s', p_version, p_hostname, i.queues), 2000),
            jsonb_build_object('reported_gpu_name', left(p_gpu_name, 200), 'reported_vram_mb', p_vram_mb,
                               'requeued_jobs', n));
    return query
    select i.id, i.provider, i.queues, coalesce(i.max_concurrency, 1),
           least(coalesce(i.vram_mb, 0), coalesce(p_vram_mb, i.vram_mb, 0)),
           c.min_lease_seconds, c.max_lease_seconds
      from gpuq.config c;
end $$;

-- Claim up to p_limit jobs for the instance: from those of p_queues it serves (null: all it serves), in
-- that order, each queue by priority (highest first), then run_after, then id; never more than its free
-- capacity, never a job needing more VRAM than it has. Each claim bumps the attempt and issues a random
-- lease token. Jobs whose lease expired are first dealt with (_reap_expired), in the same transaction,
-- so no sweeper is needed.
create function gpuq.claim_jobs(
    p_secret        text,
    p_queues        text[] default null,
    p_limit         integer default 1,
    p_lease_seconds integer default 60
) returns setof gpuq.jobs
language plpgsql security definer set search_path = pg_catalog, pg_temp
set plan_cache_mode = force_generic_plan set jit = off as $$
declare
    i gpuq.instances;
    v_queues text[];
    v_free integer;
    v_vram integer;
    v_lease interval;
    v_grace integer;
    v_expired boolean;
    n integer;
begin
    i := gpuq._instance_for(p_secret);
    v_lease := gpuq._lease(p_lease_seconds);
    if p_limit is null or p_limit < 1 or i.status not in ('requested', 'booting', 'idle', 'busy') then
        return;
    end if;
    select coalesce(array_agg(q.name order by q.pos), '{}') into v_queues
      from (select name, min(pos) as pos
              from unnest(coalesce(p_queues, i.queues)) with ordinality as u (name, pos)
             where name = any (i.queues)
             group by name) as q;
    v_vram := least(coalesce(i.vram_mb, 0), coalesce(i.reported_vram_mb, i.vram_mb, 0));
    -- cheap probes of jobs_lease_idx and jobs_claim_idx: with nothing expired and nothing to take, answer
    -- without writing anything (an idle fleet polls: through a transaction pooler it has no LISTEN)
    v_expired := exists (select 1 from gpuq.jobs where status = 'running' and lease_expires_at < now());
    if not v_expired and not exists (select 1 from gpuq.jobs
                                      where queue = any (v_queues) and status = 'queued' and run_after <= now()
                                        and min_vram_mb <= v_vram) then
        return;
    end if;
    -- one claim at a time per instance, so two at once cannot both take its free capacity
    perform 1 from gpuq.instances where id = i.id for no key update;
    v_free := least(p_limit, coalesce(i.max_concurrency, 1)
                             - (select count(*) from gpuq.jobs where instance_id = i.id and status = 'running'));
    if v_free < 1 or cardinality(v_queues) = 0 then
        return;
    end if;
    v_grace := (select timeout_grace_seconds from gpuq.config);
    if v_expired then
        perform gpuq._reap_expired(v_queues);
    end if;

    return query
    with ready as (
        select j.id, q.pos, j.priority, j.run_after
          from unnest(v_queues) with ordinality as q (name, pos)
          cross join lateral (
              select id, priority, run_after from gpuq.jobs
               where queue = q.name and status = 'queued' and run_after <= now() and min_vram_mb <= v_vram
               order by priority desc, run_after, id
               limit v_free
               for update skip locked
          ) as j
    ), picked as (
        select id from ready order by pos, priority desc, run_after, id limit v_free
    )
    update gpuq.jobs j
       set status = 'running',
           attempt = j.attempt + 1,
           instance_id = i.id,
           lease_expires_at = least(now() + v_lease, now() + make_interval(secs => j.timeout_seconds + v_grace)),
           lease_token = gen_random_uuid(),
           started_at = now(),
           progress = null,
           progress_message = null
     where j.id = any (array(select id from picked))
    returning j.*;

    get diagnostics n = row_count;
    if n > 0 then
        update gpuq.instances set status = 'busy', last_job_at = now()
         where id = i.id and status in ('requested', 'booting', 'idle');
    end if;
end $$;

-- Called by a worker well inside its lease, naming every (job, lease token) it holds. Extends those leases
-- (never past the job's timeout plus the grace; not a cancelled job's); a job the instance holds but did
-- not name ends its attempt at once (_end_attempts: a claim whose reply was lost). Answers:
--   (job_id, token, 'cancel')   cancellation requested: stop it, then fail_job(CANCELLED)
--   (job_id, token, 'timeout')  it ran past timeout_seconds: stop it, then fail_job(TIMEOUT)
--   (job_id, token, 'lost')     this instance does not hold that job under that token: stop it, report nothing
--   (null,   null,  'drain')    the instance is draining: claim nothing more
-- An ended instance's secret no longer works: the call fails with GQ401.
create function gpuq.heartbeat(
    p_secret        text,
    p_job_ids       bigint[] default '{}',
    p_tokens        uuid[] default '{}',
    p_metrics       jsonb default null,
    p_lease_seconds integer default 60
) returns table (job_id bigint, lease_token uuid, action text)
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    i gpuq.instances;
    v_lease interval;
begin
    i := gpuq._instance_for(p_secret);
    v_lease := gpuq._lease(p_lease_seconds);
    if coalesce(cardinality(p_job_ids), 0) <> coalesce(cardinality(p_tokens), 0) then
        raise exception using errcode = 'GQ400', message = 'p_job_ids and p_tokens must have the same length';
    end if;
    if coalesce(cardinality(p_job_ids), 0) > 4096 then
        raise exception using errcode = 'GQ400', message = 'a heartbeat names at most 4096 jobs';
    end if;
    -- a heartbeat lost in a database crash costs nothing the next one does not repair: no WAL flush to wait for
    perform set_config('synchronous_commit', 'off', true);

    update gpuq.jobs j
       set lease_expires_at = least(now() + v_lease, gpuq._lease_cap(j.started_at, j.timeout_seconds))
      from unnest(p_job_ids, p_tokens) as h (id, token)
     where j.id = h.id and j.lease_token = h.token and j.instance_id = i.id and j.status = 'running'
       and j.cancel_requested_at is null;

    perform gpuq._end_attempts(
        array(select j.id from gpuq.jobs j
               where j.instance_id = i.id and j.status = 'running'
                 and not exists (select 1 from unnest(p_job_ids, p_tokens) as h (id, token)
                                  where h.id = j.id and h.token = j.lease_token)
               order by j.id
               for update),
        'its instance no longer named it (a lost claim reply or a restarted worker); queued again');

    update gpuq.instances i2
       set last_heartbeat_at = now(),
           -- an oversized report is dropped, not the heartbeat: the leases matter more
           metrics = case when p_metrics is not null and pg_column_size(p_metrics) <= 16384
                          then p_metrics else i2.metrics end,
           ready_at = coalesce(i2.ready_at, now()),
           status = case
               when i2.status in ('requested', 'booting', 'idle', 'busy') then
                   case when exists (select 1 from gpuq.jobs r where r.instance_id = i2.id and r.status = 'running')
                        then 'busy' else 'idle' end::gpuq.instance_status
               else i2.status end
     where i2.id = i.id;

    return query
    select j.id, j.lease_token, case when j.cancel_requested_at is not null then 'cancel' else 'timeout' end
      from gpuq.jobs j
     where j.instance_id = i.id and j.status = 'running'
       and (j.cancel_requested_at is not null
            or j.started_at + make_interval(secs => j.timeout_seconds) <= now())
    union all
    select h.id, h.token, 'lost'
      from unnest(p_job_ids, p_tokens) as h (id, token)
     where not exists (select 1 from gpuq.jobs j
                        where j.id = h.id and j.lease_token = h.token and j.status = 'running'
                          and j.instance_id = i.id)
    union all
    select null, null, 'drain' where i.status = 'draining';
end $$;

create function gpuq.report_progress(p_secret text, p_job_id bigint, p_token uuid, p_percent integer,
                                     p_message text default null) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    i gpuq.instances;
    v_percent integer := least(greatest(p_percent, 0), 100);
    v_message text := left(p_message, 500);
begin
    i := gpuq._instance_for(p_secret);
    perform set_config('synchronous_commit', 'off', true);  -- a progress report may be lost in a crash
    update gpuq.jobs
       set progress = v_percent, progress_message = v_message
     where id = p_job_id and lease_token = p_token and instance_id = i.id and status = 'running';
    if not found then
        perform gpuq._not_held(p_job_id);
    end if;
    perform pg_notify('gpuq_progress', json_build_object('id', p_job_id, 'progress', v_percent,
                                                         'message', v_message)::text);
end $$;

-- Complete jobs the instance holds, in one transaction. Answers, for each job given, whether it is
-- completed: true also when that token already completed it (a retry after a lost reply); false when the
-- instance does not hold it under that token. A result must be a JSON object of at most 64 KiB.
create function gpuq.complete_jobs(p_secret text, p_job_ids bigint[], p_tokens uuid[],
                                   p_results jsonb[] default null)
returns table (job_id bigint, completed boolean)
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    i gpuq.instances;
    v_bad bigint;
begin
    i := gpuq._instance_for(p_secret);
    if cardinality(p_job_ids) <> cardinality(p_tokens)
       or (p_results is not null and cardinality(p_results) <> cardinality(p_job_ids)) then
        raise exception using errcode = 'GQ400', message = 'p_job_ids, p_tokens and p_results must have the same length';
    end if;
    if cardinality(p_job_ids) > 4096 then
        raise exception using errcode = 'GQ400', message = 'complete at most 4096 jobs at once';
    end if;
    if exists (select 1 from unnest(p_results) as r (v) where v is not null and jsonb_typeof(v) <> 'object') then
        raise exception using errcode = 'GQ400', message = 'a job result must be a JSON object';
    end if;
    select g.id into v_bad from unnest(p_job_ids, p_results) as g (id, result)
     where pg_column_size(g.result) > 65536 limit 1;
    if v_bad is not null then
        raise exception using errcode = 'GQ400',
            message = format('the result of job %s is over 64 KiB: store large outputs and put their URLs in the result',
                             v_bad);
    end if;

    return query
    with given as (
        select g.id, g.token, g.result
          from unnest(p_job_ids, p_tokens, coalesce(p_results, array[]::jsonb[])) as g (id, token, result)
    ), done as (
        update gpuq.jobs j
           set status = 'succeeded', result = coalesce(given.result, '{}'), finished_at = now(),
               lease_expires_at = null, progress = 100, error_code = null, error_message = null
          from given
         -- driven by the primary key (= any), not by a join the planner may turn into a scan of all
         -- running jobs per given row
         where j.id = any (p_job_ids) and j.id = given.id and j.lease_token = given.token
           and j.instance_id = i.id and j.status = 'running'
        returning j.id, j.queue
    ), touched as (
        update gpuq.instances set last_job_at = now() where id = i.id and exists (select 1 from done)
    ), notified as (
        select done.id, gpuq._notify_finished(done.id, 'succeeded', done.queue) from done
    )
    select given.id,
           exists (select 1 from notified n where n.id = given.id)
           or exists (select 1 from gpuq.jobs j  -- completed earlier by this same lease
                       where j.id = given.id and j.lease_token = given.token and j.instance_id = i.id
                         and j.status = 'succeeded')
      from given;
end $$;

create function gpuq.complete_job(p_secret text, p_job_id bigint, p_token uuid, p_result jsonb default '{}')
returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    if not (select c.completed from gpuq.complete_jobs(p_secret, array[p_job_id], array[p_token],
                                                       array[p_result]) as c) then
        perform gpuq._not_held(p_job_id);
    end if;
end $$;

-- Fail the attempt the instance holds under p_token. Retryable errors go back to the queue after a
-- backoff while attempts remain; others fail the job at once; a job whose cancellation was requested ends
-- cancelled. Answers the job's new status (the same answer again when that token already failed it).
create function gpuq.fail_job(
    p_secret     text,
    p_job_id     bigint,
    p_token      uuid,
    p_error_code text,
    p_message    text,
    p_retryable  boolean default null,  -- null: the code's default
    p_details    jsonb default null     -- e.g. {"traceback": "..."}; kept in the history only
) returns gpuq.job_status
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    i gpuq.instances;
    j gpuq.jobs;
    v_retryable boolean;
    v_status gpuq.job_status;
    v_event text;
    v_message text := left(coalesce(p_message, p_error_code), 2000);
    v_details jsonb := p_details;
begin
    i := gpuq._instance_for(p_secret);
    select e.retryable into v_retryable from gpuq.error_codes e where e.code = p_error_code;
    if not found then
        raise exception using errcode = 'GQ400',
            message = format('unknown error code %L', left(p_error_code, 100)),
            hint = 'see select code from gpuq.error_codes';
    end if;
    v_retryable := coalesce(p_retryable, v_retryable);
    if pg_column_size(v_details) > 65536 then  -- keep the failure, cut the traceback
        v_details := jsonb_build_object('truncated', true, 'head', left(v_details::text, 16000));
    end if;

    select * into j from gpuq.jobs
     where id = p_job_id and lease_token = p_token and instance_id = i.id and status = 'running'
       for update;
    if not found then
        select status into v_status from gpuq.jobs
         where id = p_job_id and lease_token = p_token and status in ('queued', 'failed', 'cancelled');
        if found then
            return v_status;  -- this token's fail was recorded already (a retry after a lost reply)
        end if;
        perform gpuq._not_held(p_job_id);
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
           error_message = v_message,
           lease_expires_at = null,
           run_after = case when v_status = 'queued' then now() + gpuq.retry_delay(j.attempt - j.releases)
                            else run_after end,
           finished_at = case when v_status = 'queued' then null else now() end,
           instance_id = case when v_status = 'queued' then null else instance_id end
     where id = p_job_id;

    insert into gpuq.job_events (job_id, attempt, event, instance_id, started_at, error_code, message, details)
    values (p_job_id, j.attempt, v_event, j.instance_id, j.started_at, p_error_code, v_message, v_details);
    update gpuq.instances set last_job_at = now() where id = i.id;
    if v_status <> 'queued' then
        perform gpuq._notify_finished(p_job_id, v_status, j.queue);
    end if;
    return v_status;
end $$;

-- A draining worker hands back the jobs it names (with their tokens): queued again at their old place, no
-- attempt used up; a job whose cancellation was requested ends cancelled. Answers how many went back.
create function gpuq.release_jobs(p_secret text, p_job_ids bigint[], p_tokens uuid[]) returns integer
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    i gpuq.instances;
begin
    i := gpuq._instance_for(p_secret);
    if coalesce(cardinality(p_job_ids), 0) <> coalesce(cardinality(p_tokens), 0) then
        raise exception using errcode = 'GQ400', message = 'p_job_ids and p_tokens must have the same length';
    end if;
    return gpuq._release(
        i.id,
        array(select j.id from gpuq.jobs j join unnest(p_job_ids, p_tokens) as h (id, token)
                on h.id = j.id and h.token = j.lease_token
               where j.instance_id = i.id and j.status = 'running'),
        'handed back by a draining worker');
end $$;

-- The worker asks for its instance to drain: it claims nothing more.
create function gpuq.request_drain(p_secret text, p_reason text default null) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    i gpuq.instances;
begin
    i := gpuq._instance_for(p_secret);
    update gpuq.instances set status = 'draining'
     where id = i.id and status in ('requested', 'booting', 'idle', 'busy');
    if found then
        insert into gpuq.instance_events (instance_id, event, status, message)
        values (i.id, 'draining', 'draining', left(p_reason, 2000));
    end if;
end $$;

-- A worker exiting for good: hands back what it still holds and gives up its secret. A machine the
-- manager rented (it has our label) stays `draining` until the manager destroys it — it still bills, so
-- the books must not call it terminated; any other (a local process, a hand-started worker) is
-- terminated. Answers the jobs handed back.
create function gpuq.deregister_instance(p_secret text, p_reason text default 'worker exited')
returns integer
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    i gpuq.instances;
    n integer;
    v_ended boolean := false;
begin
    i := gpuq._instance_for(p_secret);
    n := gpuq._release(i.id, null, 'handed back by its exiting worker');
    update gpuq.instances
       set status = case when label is not null then 'draining' else 'terminated' end::gpuq.instance_status,
           terminated_at = case when label is not null then terminated_at else coalesce(terminated_at, now()) end,
           end_reason = coalesce(end_reason, left(p_reason, 2000)),
           secret_sha256 = null
     where id = i.id
    returning terminated_at is not null into v_ended;
    insert into gpuq.instance_events (instance_id, event, status, message)
    values (i.id, 'deregistered', case when v_ended then 'terminated' else 'draining' end::gpuq.instance_status,
            left(p_reason, 2000));
    return n;
end $$;

-- Seconds since the manager's last tick; null when no manager ever ticked on this database.
create function gpuq.manager_silence_seconds(p_secret text) returns double precision
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    perform gpuq._instance_for(p_secret);
    return (select extract(epoch from now() - last_tick_at)::double precision from gpuq.manager_ticks);
end $$;

---------------------------------------------------------------------------------------------------
-- Access. Functions are executable by PUBLIC unless revoked, and a per-schema default-privilege revoke
-- (0001) does nothing against that global default: each function is revoked here by name, and
-- `gpuq migrate` revokes whatever is left in schema gpuq from PUBLIC, anon and authenticated after every run.

revoke all on gpuq.config from public;
revoke execute on function
    gpuq._instance_for(text), gpuq._not_held(bigint), gpuq._lease(integer),
    gpuq._lease_cap(timestamptz, integer), gpuq._end_attempts(bigint[], text), gpuq._reap_expired(text[]),
    gpuq._release(bigint, bigint[], text), gpuq._revoke_ended_secret(),
    gpuq.retry_delay(integer), gpuq.reap_expired(),
    gpuq.record_rent(text, text, text, text, text, text, integer, integer, numeric, boolean, text[], text, integer, bytea),
    gpuq.enroll_instance(bytea, text[], integer, integer, text, text, interval, text),
    gpuq.release_instance_jobs(bigint), gpuq.revoke_instance(bigint, text), gpuq.mark_failed(bigint, text), gpuq.mark_lost(bigint, text),
    gpuq.record_destroy(bigint, text, boolean, timestamptz), gpuq.cancel_job(bigint),
    gpuq.register_instance(text, text, integer, integer, text, text, bytea),
    gpuq.claim_jobs(text, text[], integer, integer),
    gpuq.heartbeat(text, bigint[], uuid[], jsonb, integer),
    gpuq.report_progress(text, bigint, uuid, integer, text),
    gpuq.complete_jobs(text, bigint[], uuid[], jsonb[]),
    gpuq.complete_job(text, bigint, uuid, jsonb),
    gpuq.fail_job(text, bigint, uuid, text, text, boolean, jsonb),
    gpuq.release_jobs(text, bigint[], uuid[]),
    gpuq.request_drain(text, text),
    gpuq.deregister_instance(text, text),
    gpuq.manager_silence_seconds(text)
from public;

do $$
declare
    r text;
begin
    foreach r in array array['anon', 'authenticated'] loop  -- Supabase's API roles, where they exist
        if exists (select 1 from pg_roles where rolname = r) then
            execute format('revoke all on gpuq.config from %I', r);
            execute format('revoke execute on all functions in schema gpuq from %I', r);
        end if;
    end loop;
    if exists (select 1 from pg_roles where rolname = 'gpuq_worker') then
        -- the manager's drain is not the worker's: a worker drains only itself (request_drain)
        revoke execute on function gpuq.drain_instance(bigint, text) from gpuq_worker;
        grant execute on function
            gpuq.register_instance(text, text, integer, integer, text, text, bytea),
            gpuq.claim_jobs(text, text[], integer, integer),
            gpuq.heartbeat(text, bigint[], uuid[], jsonb, integer),
            gpuq.report_progress(text, bigint, uuid, integer, text),
            gpuq.complete_jobs(text, bigint[], uuid[], jsonb[]),
            gpuq.complete_job(text, bigint, uuid, jsonb),
            gpuq.fail_job(text, bigint, uuid, text, text, boolean, jsonb),
            gpuq.release_jobs(text, bigint[], uuid[]),
            gpuq.request_drain(text, text),
            gpuq.deregister_instance(text, text),
            gpuq.manager_silence_seconds(text)
        to gpuq_worker;
    end if;
    if exists (select 1 from pg_roles where rolname = 'gpuq_manager') then
        grant execute on function
            gpuq.record_rent(text, text, text, text, text, text, integer, integer, numeric, boolean, text[], text,
                             integer, bytea),
            gpuq.enroll_instance(bytea, text[], integer, integer, text, text, interval, text),
            gpuq.revoke_instance(bigint, text),
            gpuq.release_instance_jobs(bigint)
        to gpuq_manager;
    end if;
end $$;
