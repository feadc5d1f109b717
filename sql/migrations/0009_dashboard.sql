-- gpuq 0009: the operator's dashboard. Pausing a queue, the controls an operator clicks (each an existing
-- transition, recorded with who asked), and the reads the page shows, each cheap at 10^6 finished jobs.
--
-- * Pausing is part of the queue contract: a paused queue (gpuq.queue_settings.paused_at set) is not
--   claimed (claim_jobs below, restated from 0006 with that one filter) and not scaled (the manager reads
--   paused_queues() into its snapshot and rents nothing for it). Jobs may still be enqueued; jobs already
--   running finish.
-- * Controls: operator_cancel_job, operator_retry_job, operator_drain_instance, operator_destroy_instance,
--   pause_queue and resume_queue each call the transition (cancel_job, retry_job, drain_instance,
--   revoke_instance) and write one gpuq.operator_actions row naming the actor, in the same transaction.
--   "Destroy" is revoke_instance: the web request calls no provider; the instance's secret dies and its jobs
--   go back at once, and the manager's next tick destroys the machine (a failed instance) and verifies it.
-- * Reads: dashboard_queues, dashboard_queue_outcomes, dashboard_failures, dashboard_instances,
--   dashboard_jobs, dashboard_money, dashboard_decisions, dashboard_actions, dashboard_queue_depth and
--   dashboard_fleet_history. None reads the history: each costs what live rows, the last day's jobs or a
--   bounded number of rows number (scripts/bench_dashboard.py); job_events and instance_events get an index
--   on `at`.
-- * Roles: gpuq_observer may read all of that; gpuq_operator may also act; gpuq_manager gets both, so that
--   `gpuq manager run` can serve the dashboard with its own login.

---------------------------------------------------------------------------------------------------
-- Pausing, and who did what.

alter table gpuq.queue_settings
    add column paused_at    timestamptz,
    add column paused_by    text
        constraint paused_by_must_be_1_to_100_characters check (char_length(paused_by) between 1 and 100),
    add column pause_reason text
        constraint pause_reason_must_be_at_most_500_characters check (char_length(pause_reason) <= 500);

create table gpuq.operator_actions (
    id     bigint generated always as identity primary key,
    at     timestamptz not null default now(),
    actor  text not null
        constraint actor_must_be_1_to_100_characters check (char_length(actor) between 1 and 100),
    action text not null constraint action_must_be_known check (action in (
               'cancel_job', 'retry_job', 'drain_instance', 'destroy_instance',
               'pause_queue', 'resume_queue')),
    target text not null,
    outcome text,
    reason text constraint reason_must_be_at_most_500_characters check (char_length(reason) <= 500)
);
alter table gpuq.operator_actions enable row level security;

-- The dashboard's reads: recent history by time (failures, the decisions list) without a scan.
create index job_events_at_idx on gpuq.job_events (at);
create index instance_events_at_idx on gpuq.instance_events (at);

create function gpuq._record_action(p_actor text, p_action text, p_target text, p_outcome text, p_reason text)
returns void
language sql as $$
    insert into gpuq.operator_actions (actor, action, target, outcome, reason)
    values (p_actor, p_action, p_target, p_outcome, left(p_reason, 500))
$$;

---------------------------------------------------------------------------------------------------
-- The queue contract: pause and resume.

-- Pause a queue: claim_jobs takes none of its jobs and the manager rents nothing for it until it is
-- resumed. Answers false when it was paused already (the first pause's time and actor are kept).
create function gpuq.pause_queue(p_queue text, p_actor text, p_reason text default null) returns boolean
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    v_was timestamptz;
begin
    select paused_at into v_was from gpuq.queue_settings where queue = p_queue for update;
    insert into gpuq.queue_settings as s (queue, paused_at, paused_by, pause_reason)
    values (p_queue, now(), p_actor, left(p_reason, 500))
    on conflict (queue) do update
       set paused_at = coalesce(s.paused_at, excluded.paused_at),
           paused_by = case when s.paused_at is null then excluded.paused_by else s.paused_by end,
           pause_reason = case when s.paused_at is null then excluded.pause_reason else s.pause_reason end;
    perform gpuq._record_action(p_actor, 'pause_queue', p_queue,
                                case when v_was is null then 'paused' else 'already paused' end, p_reason);
    return v_was is null;
end $$;

-- Resume a paused queue: claimable again at once (a NOTIFY wakes the workers). Answers false when it was
-- not paused.
create function gpuq.resume_queue(p_queue text, p_actor text, p_reason text default null) returns boolean
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    v_was timestamptz;
begin
    select paused_at into v_was from gpuq.queue_settings where queue = p_queue for update;
    update gpuq.queue_settings set paused_at = null, paused_by = null, pause_reason = null
     where queue = p_queue;
    perform gpuq._record_action(p_actor, 'resume_queue', p_queue,
                                case when v_was is null then 'was not paused' else 'resumed' end, p_reason);
    if v_was is not null then
        perform pg_notify('gpuq_jobs', p_queue);
    end if;
    return v_was is not null;
end $$;

-- The paused queues, for the manager's snapshot and the page.
create function gpuq.paused_queues()
returns table (queue text, paused_at timestamptz, paused_by text, reason text)
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    select s.queue, s.paused_at, s.paused_by, s.pause_reason
      from gpuq.queue_settings s where s.paused_at is not null order by s.queue
$$;

---------------------------------------------------------------------------------------------------
-- claim_jobs as in 0006, with one change: a paused queue's jobs are not claimed (the queue is left out of
-- those the instance is served, as one it does not serve would be). Same signature, so its grants stand.

-- Claim up to p_limit jobs for the instance: from those of p_queues it serves (null: all it serves), in
-- that order, each queue by priority (highest first), then run_after, then id; never more than its free
-- capacity, never a job needing more VRAM than it has. Each claim bumps the attempt and issues a random
-- lease token. Jobs whose lease expired are first dealt with (_reap_expired), in the same transaction,
-- so no sweeper is needed.
create or replace function gpuq.claim_jobs(
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
               and not exists (select 1 from gpuq.queue_settings s
                                where s.queue = name and s.paused_at is not null)
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

---------------------------------------------------------------------------------------------------
-- Controls: each calls one existing transition and records who asked, in the same transaction (a refused
-- transition records nothing). p_actor is who the caller (the dashboard) authenticated.

-- Cancel: a queued job ends at once; a running one is asked to stop through its worker's heartbeat.
create function gpuq.operator_cancel_job(p_job_id bigint, p_actor text, p_reason text default null)
returns gpuq.job_status
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    v_before gpuq.job_status;
    v_status gpuq.job_status;
begin
    select status into v_before from gpuq.jobs where id = p_job_id;
    v_status := gpuq.cancel_job(p_job_id);
    perform gpuq._record_action(p_actor, 'cancel_job', p_job_id::text,
                                case when v_before = 'running' and v_status = 'running'
                                     then 'cancel requested from its worker'
                                     when v_before = 'queued' then 'cancelled'
                                     else format('nothing to cancel: %s', v_status) end,
                                p_reason);
    return v_status;
end $$;

-- Retry: a failed or cancelled job is queued again (GQ400 for any other).
create function gpuq.operator_retry_job(p_job_id bigint, p_actor text, p_reason text default null)
returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    perform gpuq.retry_job(p_job_id);
    perform gpuq._record_action(p_actor, 'retry_job', p_job_id::text, 'queued again', p_reason);
end $$;

-- Drain: the instance claims nothing more; the manager destroys it once its jobs are done. Answers its
-- status now.
create function gpuq.operator_drain_instance(p_instance_id bigint, p_actor text, p_reason text default null)
returns gpuq.instance_status
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    v_status gpuq.instance_status;
begin
    perform gpuq.drain_instance(p_instance_id,
                                left(format('drained by %s%s', p_actor, ': ' || p_reason), 2000));
    select status into v_status from gpuq.instances where id = p_instance_id;
    perform gpuq._record_action(p_actor, 'drain_instance', p_instance_id::text, v_status::text, p_reason);
    return v_status;
end $$;

-- Destroy, as far as a web request may go: revoke_instance ends the instance now (its secret stops
-- working, its jobs go back to the queue), and the manager's next tick destroys the machine at its
-- provider and verifies that (a failed instance is destroyed), so no provider call hangs a page and the
-- books stay the manager's. Answers the jobs that went back.
create function gpuq.operator_destroy_instance(p_instance_id bigint, p_actor text, p_reason text default null)
returns integer
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    n integer;
begin
    n := gpuq.revoke_instance(p_instance_id,
                              left(format('destroyed by %s%s', p_actor, ': ' || p_reason), 2000));
    perform gpuq._record_action(p_actor, 'destroy_instance', p_instance_id::text,
                                format('revoked; %s job(s) back in the queue', n), p_reason);
    return n;
end $$;

---------------------------------------------------------------------------------------------------
-- Reads for the page. Each touches live rows, the last day's finished jobs or a bounded number of rows,
-- through an index: none scans the history. JIT is off in each: their estimates (a set-returning function
-- counts as 1000 rows) can pass jit_above_cost on small tables, and compiling then took 400 ms of a 20 ms
-- query (scripts/bench_dashboard.py).

-- Per queue now: claimable, scheduled and running jobs, the oldest claimable job's wait, and whether it is
-- paused (a paused queue with no jobs is listed too). Queued and running rows come through their own partial
-- indexes: one `status in ('queued', 'running')` scan, as queue_stats() (0001) has, reads every finished job
-- too (a sequential scan, 100 ms at 10^6).
create function gpuq.dashboard_queues()
returns table (queue text, paused_at timestamptz, paused_by text, pause_reason text, queued bigint,
               scheduled bigint, running bigint, oldest_wait interval)
language sql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
    with waiting as (
        select j.queue,
               count(*) filter (where j.run_after <= now()) as queued,
               count(*) filter (where j.run_after > now()) as scheduled,
               min(greatest(j.run_after, j.created_at)) filter (where j.run_after <= now()) as oldest
          from gpuq.jobs j
         where j.status = 'queued'
         group by j.queue
    ), running as (
        select j.queue, count(*) as running from gpuq.jobs j where j.status = 'running' group by j.queue
    ), paused as (
        select * from gpuq.queue_settings where paused_at is not null
    ), names as (
        select waiting.queue from waiting union select running.queue from running
        union select paused.queue from paused
    )
    select n.queue, p.paused_at, p.paused_by, p.pause_reason, coalesce(w.queued, 0), coalesce(w.scheduled, 0),
           coalesce(r.running, 0), now() - w.oldest
      from names n
      left join waiting w on w.queue = n.queue
      left join running r on r.queue = n.queue
      left join paused p on p.queue = n.queue
     order by n.queue
$$;

-- Per queue, from the jobs that finished in the last day (jobs_finished_idx): outcomes in the last hour and
-- day, the median wait and run time of the last hour's, and throughput (succeeded per minute over the last
-- hour). It costs what a day's jobs number (the page reads it every 30 s).
create function gpuq.dashboard_queue_outcomes()
returns table (queue text, succeeded_1h bigint, failed_1h bigint, succeeded_24h bigint, failed_24h bigint,
               cancelled_24h bigint, wait_p50 interval, run_p50 interval, per_minute_1h numeric)
language sql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
    select j.queue,
           count(*) filter (where j.status = 'succeeded' and j.finished_at > h.start),
           count(*) filter (where j.status = 'failed' and j.finished_at > h.start),
           count(*) filter (where j.status = 'succeeded'),
           count(*) filter (where j.status = 'failed'),
           count(*) filter (where j.status = 'cancelled'),
           percentile_cont(0.5) within group (order by j.started_at - greatest(j.run_after, j.created_at))
               filter (where j.started_at is not null and j.finished_at > h.start),
           percentile_cont(0.5) within group (order by j.finished_at - j.started_at)
               filter (where j.status = 'succeeded' and j.finished_at > h.start),
           round(count(*) filter (where j.status = 'succeeded' and j.finished_at > h.start) / 60.0, 2)
      from gpuq.jobs j, (select now() - interval '1 hour' as start) as h
     where j.finished_at > now() - interval '24 hours'
     group by j.queue
     order by j.queue
$$;

-- Failures by error code since now() - p_since, as failure_stats() (0001) counts them, with each event's
-- queue read by primary key: failure_stats() hash-joins the events with every job (a sequential scan of
-- the history). Costs what the window's failures number.
create function gpuq.dashboard_failures(p_since interval default '24 hours')
returns table (error_code text, retryable boolean, failed bigint, retried bigint, lease_expired bigint,
               queues text[], last_at timestamptz, last_message text)
language sql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
    select e.error_code, c.retryable,
           count(*) filter (where e.event = 'failed'),
           count(*) filter (where e.event = 'retry_scheduled'),
           count(*) filter (where e.event = 'lease_expired'),
           array_agg(distinct e.queue),
           max(e.at),
           (array_agg(e.message order by e.at desc))[1]
      from (select e.error_code, e.event, e.at, e.message,
                   (select j.queue from gpuq.jobs j where j.id = e.job_id) as queue
              from gpuq.job_events e
             where e.at > now() - p_since and e.error_code is not null and e.event <> 'cancelled') as e
      left join gpuq.error_codes c on c.code = e.error_code
     group by e.error_code, c.retryable
     order by count(*) desc
$$;

-- Instances not ended, and those that ended in the last hour: what they are, what they cost, the jobs they
-- run and the metrics of their last heartbeat (as the host sent them: a stranger's JSON, read it with
-- care).
create function gpuq.dashboard_instances(p_limit integer default 200)
returns table (id bigint, provider text, provider_instance_id text, label text, status gpuq.instance_status,
               gpu_name text, gpu_count integer, vram_mb integer, dph numeric, queues text[],
               max_concurrency integer, hostname text, version text, created_at timestamptz,
               ready_at timestamptz, last_heartbeat_at timestamptz, terminated_at timestamptz,
               end_reason text, running_jobs bigint[], metrics jsonb)
language sql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
    select i.id, i.provider, i.provider_instance_id, i.label, i.status, i.gpu_name, i.gpu_count, i.vram_mb,
           i.dph, i.queues, i.max_concurrency, i.hostname, i.version, i.created_at, i.ready_at,
           i.last_heartbeat_at, i.terminated_at, i.end_reason,
           array(select j.id from gpuq.jobs j
                  where j.instance_id = i.id and j.status = 'running' order by j.id),
           i.metrics
      from gpuq.instances i
     where i.terminated_at is null or i.terminated_at > now() - interval '1 hour'
     order by i.terminated_at is not null, i.id desc
     limit least(greatest(p_limit, 1), 1000)
$$;

-- Jobs for the page: every running job (up to p_limit, longest running first) and the p_limit that
-- finished last. Payloads and results are left out: they are the apps' data, not the operator's view.
create function gpuq.dashboard_jobs(p_limit integer default 50)
returns table (id bigint, queue text, status gpuq.job_status, priority smallint, attempt integer,
               max_attempts integer, instance_id bigint, progress smallint, progress_message text,
               created_at timestamptz, started_at timestamptz, finished_at timestamptz,
               cancel_requested_at timestamptz, error_code text, error_message text)
language sql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
    (select j.id, j.queue, j.status, j.priority, j.attempt - j.releases, j.max_attempts, j.instance_id,
            j.progress, j.progress_message, j.created_at, j.started_at, j.finished_at, j.cancel_requested_at,
            j.error_code, j.error_message
       from gpuq.jobs j
      where j.status = 'running'
      order by j.started_at, j.id
      limit least(greatest(p_limit, 1), 1000))
    union all
    (select j.id, j.queue, j.status, j.priority, j.attempt - j.releases, j.max_attempts, j.instance_id,
            j.progress, j.progress_message, j.created_at, j.started_at, j.finished_at, j.cancel_requested_at,
            j.error_code, j.error_message
       from gpuq.jobs j
      where j.finished_at is not null
      order by j.finished_at desc
      limit least(greatest(p_limit, 1), 1000))
$$;

-- Money and the manager's pulse: $ billed today (the budget day in p_tz), $/h billing now (every instance
-- not ended: a failed one bills until destroyed), instances not ended, seconds since the manager's last
-- tick (null: never).
create function gpuq.dashboard_money(p_tz text default 'UTC')
returns table (spend_today_usd numeric, dph_now numeric, instances bigint, manager_silence_s double precision)
language sql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
    select gpuq.spend_today(p_tz),
           coalesce((select sum(i.dph) from gpuq.instances i where i.terminated_at is null), 0),
           (select count(*) from gpuq.instances i where i.terminated_at is null),
           (select extract(epoch from now() - t.last_tick_at)::double precision from gpuq.manager_ticks t)
$$;

-- The fleet's last events, newest first: each rent, drain, destroy, failure, loss, revoke and price change
-- with the reason recorded (the manager's decisions), and the machines it avoids.
create function gpuq.dashboard_decisions(p_limit integer default 30)
returns table (at timestamptz, instance_id bigint, provider text, event text, status gpuq.instance_status,
               dph numeric, message text)
language sql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
    select * from (
        (select e.at, e.instance_id, i.provider, e.event, e.status, e.dph, e.message
           from gpuq.instance_events e join gpuq.instances i on i.id = e.instance_id
          where e.event in ('rented', 'draining', 'destroyed', 'failed', 'lost', 'revoked', 'price_changed')
          order by e.at desc
          limit least(greatest(p_limit, 1), 500))
        union all
        (select a.at, null, a.provider, 'avoid_machine', null, null,
                format('machine %s until %s: %s', a.machine_id, a.until, a.reason)
           from gpuq.avoided_machines a
          where a.until > now()
          order by a.at desc
          limit least(greatest(p_limit, 1), 500))
    ) as x
    order by 1 desc
    limit least(greatest(p_limit, 1), 500)
$$;

-- What operators did, newest first.
create function gpuq.dashboard_actions(p_limit integer default 20)
returns table (id bigint, at timestamptz, actor text, action text, target text, outcome text, reason text)
language sql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
    select a.id, a.at, a.actor, a.action, a.target, a.outcome, a.reason
      from gpuq.operator_actions a
     order by a.id desc
     limit least(greatest(p_limit, 1), 500)
$$;

-- Claimable jobs waiting, per queue, at points p_step apart over the last p_since (the last point is now).
-- From each job's last wait: from when it became claimable (created, or its run_after) to its claim (or
-- its end, for one cancelled while queued); a retried job's earlier waits are not counted. Read from the
-- jobs that finished inside the window (jobs_finished_idx) and the live ones: +1 when a wait starts, -1
-- when it ends, summed in time order, so the cost grows with the window's jobs, not with the points.
create function gpuq.dashboard_queue_depth(p_since interval default '24 hours',
                                           p_step interval default '15 minutes')
returns table (at timestamptz, queue text, depth bigint)
language plpgsql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
#variable_conflict use_column
declare
    v_since double precision := extract(epoch from p_since);
    v_step double precision := extract(epoch from p_step);
begin
    if v_step is null or v_since is null or v_step <= 0 or v_since < 0 or v_since / v_step > 2000 then
        raise exception using errcode = 'GQ400',
            message = 'p_step must be positive and p_since at most 2000 steps long';
    end if;
    return query
    with w as (
        select now() - p_since as start, floor(v_since / v_step)::integer as n
    ), waits as (
        select j.queue, greatest(j.created_at, j.run_after) as s, coalesce(j.started_at, j.finished_at) as e
          from gpuq.jobs j, w
         where j.finished_at > w.start
        union all
        select j.queue, greatest(j.created_at, j.run_after), j.started_at
          from gpuq.jobs j where j.status = 'running'
        union all
        select j.queue, greatest(j.created_at, j.run_after), null from gpuq.jobs j where j.status = 'queued'
    ), deltas as (  -- each change at the first point at or after it (point 0 for what began earlier)
        select d.queue, greatest(0, ceil(extract(epoch from d.t - w.start)::float8 / v_step))::integer as k,
               sum(d.d) as d
          from (select waits.queue, waits.s as t, 1 as d from waits where waits.e is null or waits.e > waits.s
                union all
                select waits.queue, waits.e, -1 from waits where waits.e > waits.s) as d, w
         group by 1, 2
    )
    select w.start + make_interval(secs => k.k * v_step), q.queue,
           sum(coalesce(d.d, 0)) over (partition by q.queue order by k.k)::bigint
      from w cross join generate_series(0, w.n) as k (k)
      cross join (select distinct deltas.queue from deltas) as q
      left join deltas d on d.queue = q.queue and d.k = k.k
     order by 1, 2;
end $$;

-- The fleet at points p_step apart over the last p_since: instances not ended, $/h billing, and $ billed
-- since the window began (from the billing segments, as spend_today counts them).
create function gpuq.dashboard_fleet_history(p_since interval default '24 hours',
                                             p_step interval default '15 minutes')
returns table (at timestamptz, instances bigint, dph numeric, spend_usd numeric)
language plpgsql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
#variable_conflict use_column
declare
    v_since double precision := extract(epoch from p_since);
    v_step double precision := extract(epoch from p_step);
begin
    if v_step is null or v_since is null or v_step <= 0 or v_since < 0 or v_since / v_step > 2000 then
        raise exception using errcode = 'GQ400',
            message = 'p_step must be positive and p_since at most 2000 steps long';
    end if;
    return query
    with w as (
        select now() - p_since as start, floor(v_since / v_step)::integer as n
    ), points as (
        select w.start + make_interval(secs => k * v_step) as t from w, generate_series(0, w.n) as k
    ), seg as (  -- a segment still billing ends at now(): open it, so the last point (now) counts it
        select s.seg_start, case when s.seg_end >= now() then 'infinity' else s.seg_end end as seg_end, s.dph
          from gpuq.billing_segments() s, w
         where s.seg_end > w.start
    ), inst as materialized (  -- read once, not once per point
        select i.created_at, coalesce(i.terminated_at, 'infinity') as ended
          from gpuq.instances i, w
         where i.terminated_at is null or i.terminated_at > w.start
    )
    select p.t,
           (select count(*) from inst where inst.created_at <= p.t and inst.ended > p.t),
           coalesce((select sum(seg.dph) from seg where seg.seg_start <= p.t and seg.seg_end > p.t), 0),
           coalesce((select round(sum(seg.dph / 3600 * extract(epoch from least(seg.seg_end, p.t)
                                                                  - greatest(seg.seg_start, w.start))), 6)
                       from seg where seg.seg_start < p.t), 0)
      from points p, w
     order by 1;
end $$;

---------------------------------------------------------------------------------------------------
-- Access. New functions are executable by PUBLIC unless revoked: each is revoked here by name.

revoke all on gpuq.operator_actions from public;
revoke execute on function
    gpuq._record_action(text, text, text, text, text),
    gpuq.pause_queue(text, text, text),
    gpuq.resume_queue(text, text, text),
    gpuq.paused_queues(),
    gpuq.operator_cancel_job(bigint, text, text),
    gpuq.operator_retry_job(bigint, text, text),
    gpuq.operator_drain_instance(bigint, text, text),
    gpuq.operator_destroy_instance(bigint, text, text),
    gpuq.dashboard_queues(),
    gpuq.dashboard_queue_outcomes(),
    gpuq.dashboard_failures(interval),
    gpuq.dashboard_instances(integer),
    gpuq.dashboard_jobs(integer),
    gpuq.dashboard_money(text),
    gpuq.dashboard_decisions(integer),
    gpuq.dashboard_actions(integer),
    gpuq.dashboard_queue_depth(interval, interval),
    gpuq.dashboard_fleet_history(interval, interval)
from public;

do $$
declare
    r text;
begin
    foreach r in array array['gpuq_observer', 'gpuq_operator'] loop
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
            execute format('revoke all on gpuq.operator_actions from %I', r);
            execute format('revoke execute on all functions in schema gpuq from %I', r);
        end if;
    end loop;
    -- reading: the page
    foreach r in array array['gpuq_observer', 'gpuq_operator', 'gpuq_manager'] loop
        if exists (select 1 from pg_roles where rolname = r) then
            execute format('grant usage on schema gpuq to %I', r);
            execute format($g$grant execute on function
                gpuq.paused_queues(),
                gpuq.dashboard_queues(),
                gpuq.dashboard_queue_outcomes(),
                gpuq.dashboard_failures(interval),
                gpuq.dashboard_instances(integer),
                gpuq.dashboard_jobs(integer),
                gpuq.dashboard_money(text),
                gpuq.dashboard_decisions(integer),
                gpuq.dashboard_actions(integer),
                gpuq.dashboard_queue_depth(interval, interval),
                gpuq.dashboard_fleet_history(interval, interval)
            to %I$g$, r);
        end if;
    end loop;
    -- acting: the controls
    foreach r in array array['gpuq_operator', 'gpuq_manager'] loop
        if exists (select 1 from pg_roles where rolname = r) then
            execute format($g$grant execute on function
                gpuq.pause_queue(text, text, text),
                gpuq.resume_queue(text, text, text),
                gpuq.operator_cancel_job(bigint, text, text),
                gpuq.operator_retry_job(bigint, text, text),
                gpuq.operator_drain_instance(bigint, text, text),
                gpuq.operator_destroy_instance(bigint, text, text)
            to %I$g$, r);
        end if;
    end loop;
end $$;
