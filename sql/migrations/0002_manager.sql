-- gpuq 0002: the manager. Its instance transitions, money and the snapshot its policy reads.
--
-- The manager rents, then records; lists the provider, then repairs the database. Every change of an
-- instance it makes is one function here (Python never updates gpuq.instances itself):
--   record_rent           a rent the provider answered: a 'requested' row and its price
--   mark_booting          requested -> booting (the provider shows it)
--   mark_failed           a live instance that will not work (never ready, outbid, dead): its jobs released;
--                         it still bills until record_destroy
--   mark_lost             the provider no longer shows it: its jobs released, billing ended now
--   record_destroy        a destroy the provider confirmed by listing: billing ended at p_at
--   record_price_change   the provider bills another $/h from now on
--   adopt_orphan          an instance of ours the database never knew (rent crashed before recording)
--   avoid_machine         never rent this machine again for a while
--
-- Money: instance_events rows with event 'rented' or 'price_changed' start a billing segment at `at`
-- with their `dph`; a segment ends at the next one or at terminated_at (now() while live).
-- (register_instance, from 0001, is the ready transition: requested/booting -> idle, ready_at set.)

create table gpuq.avoided_machines (
    provider   text not null,
    machine_id text not null,
    reason     text,
    at         timestamptz not null default now(),
    until      timestamptz not null,
    primary key (provider, machine_id)
);
alter table gpuq.avoided_machines enable row level security;

---------------------------------------------------------------------------------------------------
-- Transitions.

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
    p_reason               text default null
) returns bigint
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    v_id bigint;
begin
    if p_provider_instance_id is null or p_dph is null then
        raise exception using errcode = 'GQ400', message = 'a rent needs a provider instance id and a price';
    end if;
    -- A fast worker may have registered before the manager recorded the rent: complete its row.
    insert into gpuq.instances as i (provider, provider_instance_id, offer_id, machine_id, label, status,
                                     gpu_name, gpu_count, vram_mb, dph, interruptible, queues)
    values (p_provider, p_provider_instance_id, p_offer_id, p_machine_id, p_label, 'requested',
            p_gpu_name, p_gpu_count, p_vram_mb, p_dph, p_interruptible, coalesce(p_queues, '{}'))
    on conflict (provider, provider_instance_id) do update
       set offer_id = excluded.offer_id, machine_id = excluded.machine_id, label = excluded.label,
           gpu_name = coalesce(i.gpu_name, excluded.gpu_name), gpu_count = coalesce(i.gpu_count, excluded.gpu_count),
           vram_mb = coalesce(i.vram_mb, excluded.vram_mb), dph = excluded.dph,
           interruptible = excluded.interruptible,
           queues = case when i.queues = '{}' then excluded.queues else i.queues end
    returning id into v_id;
    insert into gpuq.instance_events (instance_id, event, status, dph, message, details)
    values (v_id, 'rented', 'requested', p_dph, p_reason,
            jsonb_build_object('offer_id', p_offer_id, 'machine_id', p_machine_id, 'label', p_label));
    return v_id;
end $$;

create function gpuq.mark_booting(p_instance_id bigint, p_message text default null) returns boolean
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    update gpuq.instances set status = 'booting' where id = p_instance_id and status = 'requested';
    if found then
        insert into gpuq.instance_events (instance_id, event, status, message)
        values (p_instance_id, 'booting', 'booting', p_message);
    end if;
    return found;
end $$;

-- Answers how many running jobs went back to the queue.
create function gpuq.mark_failed(p_instance_id bigint, p_reason text) returns integer
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    n integer;
begin
    n := gpuq.release_jobs(p_instance_id, null);
    update gpuq.instances set status = 'failed', end_reason = coalesce(end_reason, p_reason)
     where id = p_instance_id and status in ('requested', 'booting', 'idle', 'busy', 'draining');
    if found then
        insert into gpuq.instance_events (instance_id, event, status, message, details)
        values (p_instance_id, 'failed', 'failed', p_reason, jsonb_build_object('released_jobs', n));
    end if;
    return n;
end $$;

-- Gone at the provider: billing ended (as far as we can know) now. Answers the jobs released.
create function gpuq.mark_lost(p_instance_id bigint, p_reason text default 'the provider no longer shows it')
returns integer
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    n integer;
    v_dph numeric;
begin
    n := gpuq.release_jobs(p_instance_id, null);
    update gpuq.instances
       set status = case when status = 'failed' then status else 'lost' end,
           terminated_at = now(), end_reason = coalesce(end_reason, p_reason)
     where id = p_instance_id and terminated_at is null
    returning dph into v_dph;
    if found then
        insert into gpuq.instance_events (instance_id, event, status, dph, message, details)
        values (p_instance_id, 'lost', 'lost', v_dph, p_reason, jsonb_build_object('released_jobs', n));
    end if;
    return n;
end $$;

-- The provider confirmed (by listing) that the instance is gone; billing ended at p_at.
-- A row never ready ends 'failed', a lost or failed one keeps its status, the rest end 'terminated'.
-- terminated_at becomes p_at even when a worker's deregistration set it earlier: the machine billed
-- until destroyed. Answers the jobs released (p_release_jobs).
create function gpuq.record_destroy(
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
        n := gpuq.release_jobs(p_instance_id, null);
    end if;
    update gpuq.instances
       set status = case when status in ('requested', 'booting') then 'failed'
                         when status in ('failed', 'lost') then status
                         else 'terminated' end::gpuq.instance_status,
           terminated_at = case when status = 'lost' then terminated_at else coalesce(p_at, now()) end,
           -- why it failed or was lost says more than "destroyed"; a worker's own "exited" says less
           end_reason = case when status in ('failed', 'lost') then coalesce(end_reason, p_reason)
                             else p_reason end
     where id = p_instance_id
    returning dph, status into v_dph, v_status;
    if not found then
        raise exception using errcode = 'GQ404', message = format('instance %s does not exist', p_instance_id);
    end if;
    insert into gpuq.instance_events (instance_id, at, event, status, dph, message, details)
    values (p_instance_id, coalesce(p_at, now()), 'destroyed', v_status, v_dph, p_reason,
            jsonb_build_object('released_jobs', n));
    return n;
end $$;

create function gpuq.record_price_change(p_instance_id bigint, p_dph numeric, p_reason text default null)
returns boolean
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    if p_dph is null or p_dph < 0 then
        raise exception using errcode = 'GQ400', message = 'a price must be a non-negative number';
    end if;
    update gpuq.instances set dph = p_dph
     where id = p_instance_id and terminated_at is null and dph is distinct from p_dph;
    if found then
        insert into gpuq.instance_events (instance_id, event, status, dph, message)
        select p_instance_id, 'price_changed', status, p_dph, p_reason from gpuq.instances where id = p_instance_id;
    end if;
    return found;
end $$;

-- An instance carrying our label that the database does not know: recorded (as failed, billing since
-- p_started_at) so that its destroy and its cost are on the books. Answers its id.
create function gpuq.adopt_orphan(
    p_provider             text,
    p_provider_instance_id text,
    p_label                text,
    p_dph                  numeric,
    p_machine_id           text default null,
    p_gpu_name             text default null,
    p_started_at           timestamptz default null
) returns bigint
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    v_id bigint;
begin
    select id into v_id from gpuq.instances
     where provider = p_provider and provider_instance_id = p_provider_instance_id;
    if v_id is not null then
        return v_id;
    end if;
    insert into gpuq.instances (provider, provider_instance_id, machine_id, label, status, gpu_name, dph,
                                created_at, end_reason)
    values (p_provider, p_provider_instance_id, p_machine_id, p_label, 'failed', p_gpu_name, p_dph,
            least(coalesce(p_started_at, now()), now()), 'orphan: unknown to the database')
    returning id into v_id;
    insert into gpuq.instance_events (instance_id, at, event, status, dph, message)
    values (v_id, least(coalesce(p_started_at, now()), now()), 'rented', 'failed', p_dph,
            'orphan found at the provider');
    return v_id;
end $$;

create function gpuq.avoid_machine(p_provider text, p_machine_id text, p_reason text,
                                   p_for interval default '7 days') returns void
language sql security definer set search_path = pg_catalog, pg_temp as $$
    insert into gpuq.avoided_machines (provider, machine_id, reason, until)
    values (p_provider, p_machine_id, p_reason, now() + p_for)
    on conflict (provider, machine_id) do update
       set reason = excluded.reason, at = now(), until = excluded.until
$$;

---------------------------------------------------------------------------------------------------
-- The policy's snapshot.

-- Instances that may be billing (not yet ended), with their running jobs and when a drain began.
create function gpuq.manager_instances()
returns table (id bigint, provider text, provider_instance_id text, offer_id text, machine_id text, label text,
               status gpuq.instance_status, gpu_name text, dph numeric, interruptible boolean, queues text[],
               created_at timestamptz, ready_at timestamptz, last_heartbeat_at timestamptz,
               last_job_at timestamptz, running_jobs bigint, draining_since timestamptz)
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    select i.id, i.provider, i.provider_instance_id, i.offer_id, i.machine_id, i.label, i.status, i.gpu_name,
           i.dph, i.interruptible, i.queues, i.created_at, i.ready_at, i.last_heartbeat_at, i.last_job_at,
           (select count(*) from gpuq.jobs j where j.instance_id = i.id and j.status = 'running'),
           (select max(e.at) from gpuq.instance_events e where e.instance_id = i.id and e.event = 'draining')
      from gpuq.instances i
     where i.terminated_at is null
     order by i.id
$$;

-- Rows ended in the database (terminated, lost) that a provider might still be billing for: what
-- reconciliation compares the provider's listing with, besides manager_instances().
create function gpuq.manager_known(p_provider text)
returns table (id bigint, provider_instance_id text, status gpuq.instance_status, terminated_at timestamptz,
               destroyed boolean)
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    select i.id, i.provider_instance_id, i.status, i.terminated_at,
           exists (select 1 from gpuq.instance_events e where e.instance_id = i.id and e.event = 'destroyed')
      from gpuq.instances i
     where i.provider = p_provider and i.provider_instance_id is not null
$$;

-- Per queue: claimable and running jobs, the oldest wait, the mean number of running jobs over the last
-- p_window, arrivals per hour over p_window, and the queue's latest rent.
create function gpuq.manager_queues(p_window interval default '20 minutes')
returns table (queue text, queued bigint, running bigint, oldest_wait_s double precision,
               recent_load double precision, arrivals_per_hour double precision, last_rent_at timestamptz)
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    with w as (
        select now() - p_window as since, extract(epoch from p_window) as secs
    ), live as (
        select j.queue,
               count(*) filter (where j.status = 'queued' and j.run_after <= now()) as queued,
               count(*) filter (where j.status = 'running') as running,
               extract(epoch from now() - min(greatest(j.run_after, j.created_at))
                   filter (where j.status = 'queued' and j.run_after <= now()))::double precision as oldest
          from gpuq.jobs j
         where j.status in ('queued', 'running')
         group by j.queue
    ), busy as (  -- running time inside the window: ended attempts and the attempts running now
        select a.queue, sum(extract(epoch from least(a.ended, now()) - greatest(a.started, w.since))) as secs
          from (select j.queue, e.started_at as started, e.at as ended
                  from gpuq.job_events e join gpuq.jobs j on j.id = e.job_id, w
                 where e.started_at is not null and e.at > w.since
                union all  -- a succeeded attempt has no event: the job row is its record
                select j.queue, j.started_at, j.finished_at from gpuq.jobs j, w
                 where j.status = 'succeeded' and j.finished_at > w.since
                union all
                select j.queue, j.started_at, now() from gpuq.jobs j where j.status = 'running') as a, w
         where a.ended > greatest(a.started, w.since)
         group by a.queue
    ), arrivals as (
        select j.queue, count(*) as n from gpuq.jobs j, w where j.created_at > w.since group by j.queue
    ), rents as (
        select i.queues[1] as queue, max(e.at) as at
          from gpuq.instance_events e join gpuq.instances i on i.id = e.instance_id
         where e.event = 'rented' and cardinality(i.queues) > 0
         group by i.queues[1]
    ), names as (
        select live.queue from live union select busy.queue from busy
        union select arrivals.queue from arrivals union select rents.queue from rents
    )
    select n.queue, coalesce(l.queued, 0), coalesce(l.running, 0), coalesce(l.oldest, 0),
           coalesce(b.secs, 0) / w.secs, coalesce(a.n, 0) * 3600.0 / w.secs, r.at
      from names n cross join w
      left join live l on l.queue = n.queue
      left join busy b on b.queue = n.queue
      left join arrivals a on a.queue = n.queue
      left join rents r on r.queue = n.queue
     order by n.queue
$$;

-- Jobs per busy hour by queue and GPU, from jobs that succeeded since now() - p_since (the job row
-- records its succeeding attempt: started_at, finished_at, instance_id).
create function gpuq.manager_throughput(p_since interval default '7 days')
returns table (queue text, gpu_name text, jobs bigint, jobs_per_hour double precision)
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    select j.queue, i.gpu_name, count(*),
           count(*) * 3600.0 / greatest(sum(extract(epoch from j.finished_at - j.started_at)), 1e-3)
      from gpuq.jobs j
      join gpuq.instances i on i.id = j.instance_id
     where j.status = 'succeeded' and j.finished_at > now() - p_since and j.started_at is not null
       and i.gpu_name is not null
     group by j.queue, i.gpu_name
     order by 1, 2
$$;

create function gpuq.avoided_machine_ids() returns setof text
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    select machine_id from gpuq.avoided_machines where until > now() order by machine_id
$$;

---------------------------------------------------------------------------------------------------
-- Money.

-- Billing segments: from each 'rented' / 'price_changed' event to the next one or the instance's end.
create function gpuq.billing_segments()
returns table (instance_id bigint, seg_start timestamptz, seg_end timestamptz, dph numeric)
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    select s.instance_id, s.at,
           greatest(s.at, coalesce(lead(s.at) over (partition by s.instance_id order by s.at, s.id),
                                   i.terminated_at, now())),
           s.dph
      from gpuq.instance_events s join gpuq.instances i on i.id = s.instance_id
     where s.event in ('rented', 'price_changed') and s.dph is not null
$$;

-- $ billed between p_from and p_to (default: all time to now), per instance.
create function gpuq.spend_by_instance(p_from timestamptz default null, p_to timestamptz default null)
returns table (instance_id bigint, provider text, provider_instance_id text, gpu_name text,
               status gpuq.instance_status, dph numeric, created_at timestamptz, terminated_at timestamptz,
               end_reason text, hours double precision, cost_usd numeric)
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    with seg as (
        select s.instance_id,
               greatest(extract(epoch from least(s.seg_end, coalesce(p_to, now()))
                                      - greatest(s.seg_start, coalesce(p_from, '-infinity'))), 0) as secs,
               s.dph
          from gpuq.billing_segments() s
    )
    select i.id, i.provider, i.provider_instance_id, i.gpu_name, i.status, i.dph, i.created_at,
           i.terminated_at, i.end_reason, (sum(seg.secs) / 3600)::double precision,
           round(sum(seg.secs * seg.dph / 3600), 6)
      from seg join gpuq.instances i on i.id = seg.instance_id
     group by i.id
     having sum(seg.secs) > 0 or i.terminated_at is null
     order by i.id
$$;

-- $ per day in p_tz, for the last p_days days, per provider.
create function gpuq.spend_by_day(p_tz text default 'UTC', p_days integer default 30)
returns table (day date, provider text, instances bigint, hours double precision, cost_usd numeric)
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    with days as (
        select d::date as day, (d at time zone p_tz) as day_start, ((d + interval '1 day') at time zone p_tz) as day_end
          from generate_series(date_trunc('day', now() at time zone p_tz) - make_interval(days => p_days - 1),
                               date_trunc('day', now() at time zone p_tz), interval '1 day') as d
    ), parts as (
        select days.day, s.instance_id, s.dph,
               extract(epoch from least(s.seg_end, days.day_end) - greatest(s.seg_start, days.day_start)) as secs
          from gpuq.billing_segments() s
          join days on s.seg_start < days.day_end and s.seg_end > days.day_start
    )
    select p.day, i.provider, count(distinct p.instance_id), (sum(p.secs) / 3600)::double precision,
           round(sum(p.secs * p.dph / 3600), 6)
      from parts p join gpuq.instances i on i.id = p.instance_id
     group by p.day, i.provider
     order by p.day, i.provider
$$;

-- $ billed since the start of today in p_tz (the budget day).
create function gpuq.spend_today(p_tz text default 'UTC') returns numeric
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    select coalesce(round(sum(extract(epoch from s.seg_end - greatest(s.seg_start, d.start)) * s.dph / 3600), 6), 0)
      from gpuq.billing_segments() s,
           (select date_trunc('day', now() at time zone p_tz) at time zone p_tz as start) as d
     where s.seg_end > d.start
$$;

-- $ per job: each instance's whole cost (busy and idle time alike) shared among the attempts it ran,
-- in proportion to their run time; run_cost_usd is the attempts' own run time x $/h. Jobs that ran
-- since p_since (default: all). An instance that ran no job is not attributed (see spend_by_instance).
create function gpuq.spend_by_job(p_since timestamptz default null, p_job_id bigint default null)
returns table (job_id bigint, queue text, status gpuq.job_status, attempts bigint, run_seconds double precision,
               run_cost_usd numeric, cost_usd numeric)
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    with attempts as (
        select e.job_id, e.instance_id, extract(epoch from e.at - e.started_at) as secs
          from gpuq.job_events e
         where e.started_at is not null and e.instance_id is not null
        union all  -- the succeeding attempt (no event: the job row is its record) and running ones
        select j.id, j.instance_id, extract(epoch from coalesce(j.finished_at, now()) - j.started_at)
          from gpuq.jobs j
         where j.status in ('succeeded', 'running') and j.instance_id is not null and j.started_at is not null
    ), per_instance as (
        select a.instance_id, sum(a.secs) as secs from attempts a group by a.instance_id
    ), cost as (
        select s.instance_id, sum(extract(epoch from s.seg_end - s.seg_start) * s.dph / 3600) as usd
          from gpuq.billing_segments() s group by s.instance_id
    ), shares as (
        select a.job_id, a.secs, a.secs * i.dph / 3600 as run_usd,
               coalesce(c.usd, 0) * a.secs / nullif(p.secs, 0) as usd
          from attempts a
          join gpuq.instances i on i.id = a.instance_id
          join per_instance p on p.instance_id = a.instance_id
          left join cost c on c.instance_id = a.instance_id
    )
    select j.id, j.queue, j.status, count(sh.job_id), coalesce(sum(sh.secs), 0)::double precision,
           round(coalesce(sum(sh.run_usd), 0), 6), round(coalesce(sum(sh.usd), 0), 6)
      from gpuq.jobs j
      left join shares sh on sh.job_id = j.id
     where (p_job_id is null or j.id = p_job_id) and (p_since is null or j.created_at >= p_since)
     group by j.id
     order by j.id
$$;

---------------------------------------------------------------------------------------------------
-- Access: nothing for PUBLIC (0001's default privileges already revoke function execute); the
-- manager's functions go to a gpuq_manager role where one can be made, the spend reports to gpuq_app.

revoke all on gpuq.avoided_machines from public;
revoke execute on all functions in schema gpuq from public;

do $$
begin
    if not exists (select 1 from pg_roles where rolname = 'gpuq_manager') then
        begin
            create role gpuq_manager nologin;
        exception when insufficient_privilege then
            raise notice 'gpuq: could not create role gpuq_manager (needs CREATEROLE); grant it by hand later';
        end;
    end if;
    if exists (select 1 from pg_roles where rolname = 'anon') then
        execute 'revoke all on gpuq.avoided_machines from anon';
    end if;
    if exists (select 1 from pg_roles where rolname = 'authenticated') then
        execute 'revoke all on gpuq.avoided_machines from authenticated';
    end if;
    if exists (select 1 from pg_roles where rolname = 'gpuq_manager') then
        grant usage on schema gpuq to gpuq_manager;
        grant execute on function
            gpuq.record_rent(text, text, text, text, text, text, integer, integer, numeric, boolean, text[], text),
            gpuq.mark_booting(bigint, text),
            gpuq.mark_failed(bigint, text),
            gpuq.mark_lost(bigint, text),
            gpuq.record_destroy(bigint, text, boolean, timestamptz),
            gpuq.record_price_change(bigint, numeric, text),
            gpuq.adopt_orphan(text, text, text, numeric, text, text, timestamptz),
            gpuq.avoid_machine(text, text, text, interval),
            gpuq.manager_instances(),
            gpuq.manager_known(text),
            gpuq.manager_queues(interval),
            gpuq.manager_throughput(interval),
            gpuq.avoided_machine_ids(),
            gpuq.billing_segments(),
            gpuq.spend_by_instance(timestamptz, timestamptz),
            gpuq.spend_by_day(text, integer),
            gpuq.spend_today(text),
            gpuq.spend_by_job(timestamptz, bigint),
            gpuq.drain_instance(bigint, text),
            gpuq.release_jobs(bigint, bigint[]),
            gpuq.reap_expired(),
            gpuq.queue_stats(),
            gpuq.instance_stats(text)
        to gpuq_manager;
    end if;
    if exists (select 1 from pg_roles where rolname = 'gpuq_app') then
        grant execute on function gpuq.spend_by_job(timestamptz, bigint) to gpuq_app;
    end if;
end $$;
