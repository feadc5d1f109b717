-- gpuq 0011: what the cost levers read (issue 12). A forecast of each queue's next hour from its own history,
-- so the manager can have machines ready when a window opens and ahead of recurring peaks (pre-warming), and
-- why each live instance is not running a job right now, so no rented minute idles unseen.

-- Per queue: the jobs and the GPU-seconds of work expected in [p_from, p_from + 1 hour), as the mean of the
-- same hour on each of the last p_days days (fewer when the history is younger: the days whose hour overlaps
-- it). Jobs are placed by when they finished (jobs_finished_idx), which for minutes-long jobs is
-- their hour; busy_s is measured on the GPUs that ran them. A queue with no history has no row.
create function gpuq.queue_forecast(p_from timestamptz default now(), p_days integer default 7)
returns table (queue text, jobs double precision, busy_s double precision, days integer)
language sql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
    with horizon as (
        -- The past days whose hour overlaps the history: a day whose hour ended before the oldest finished
        -- job saw nothing because nothing ran yet, and counting it would halve a young queue's forecast.
        select least(greatest(p_days, 1),
                     floor((extract(epoch from p_from - (select min(finished_at) from gpuq.jobs
                                                         where finished_at is not null)) + 3600) / 86400))::integer
                   as days
    ), hours as (
        select p_from - make_interval(days => k) as lo
          from horizon, generate_series(1, horizon.days) as k
    ), past as (
        select j.queue, count(*) as n,
               coalesce(sum(extract(epoch from j.finished_at - j.started_at))
                        filter (where j.status = 'succeeded' and j.started_at is not null), 0) as secs
          from hours h
          join gpuq.jobs j on j.finished_at >= h.lo and j.finished_at < h.lo + interval '1 hour'
         group by j.queue
    )
    select p.queue, p.n::double precision / h.days, p.secs::double precision / h.days, h.days
      from past p cross join horizon h
     where h.days > 0
     order by 1
$$;

-- Every live instance not running a job, with why and since when: requested (the provider has not started it),
-- booting (pulling, downloading models), draining (finishing before it is destroyed), failed (being destroyed)
-- or waiting for work (idle since its last job or since it became ready). The manager refines "waiting for work"
-- with its own settings (within the idle timeout, a break-even hold, pre-warmed for a forecast): manager/state.py.
create function gpuq.idle_by_reason()
returns table (instance_id bigint, provider text, provider_instance_id text, queues text[],
               status gpuq.instance_status, reason text, since timestamptz, idle_s double precision, dph numeric)
language sql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
    select i.id, i.provider, i.provider_instance_id, i.queues, i.status, r.reason, r.since,
           greatest(extract(epoch from now() - r.since), 0)::double precision, i.dph
      from gpuq.instances i
      cross join lateral (
          select case i.status
                     when 'requested' then 'requested'
                     when 'booting' then 'booting'
                     when 'draining' then 'draining'
                     when 'failed' then 'failed'
                     else 'waiting for work'
                 end as reason,
                 case
                     when i.status in ('requested', 'booting') then i.created_at
                     when i.status = 'draining' then
                         coalesce((select max(e.at) from gpuq.instance_events e
                                    where e.instance_id = i.id and e.event = 'draining'), i.created_at)
                     else greatest(i.last_job_at, i.ready_at, i.created_at)
                 end as since
      ) as r
     where i.terminated_at is null
       and i.status not in ('terminated', 'lost')
       and not exists (select 1 from gpuq.jobs j where j.instance_id = i.id and j.status = 'running')
     order by i.id
$$;

revoke execute on function gpuq.queue_forecast(timestamptz, integer), gpuq.idle_by_reason() from public;

do $$
begin
    if exists (select 1 from pg_roles where rolname = 'gpuq_manager') then
        grant execute on function gpuq.queue_forecast(timestamptz, integer), gpuq.idle_by_reason()
        to gpuq_manager;
    end if;
end
$$;
