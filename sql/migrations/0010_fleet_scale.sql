-- gpuq 0010: the manager's snapshot stays cheap on a long history (issue 15). With 500 instances and 10^6
-- finished jobs over a week, one tick's SQL took 446 ms, 441 ms of it in the two functions restated here, each of
-- which read the whole week. Same signatures and results: the grants of 0002 stand.

-- Jobs per busy hour by queue and GPU, from the most recent 20,000 jobs that succeeded since now() - p_since
-- (plenty to rank GPUs by), read backwards through jobs_finished_idx instead of every row of the period.
create or replace function gpuq.manager_throughput(p_since interval default '7 days')
returns table (queue text, gpu_name text, jobs bigint, jobs_per_hour double precision)
language sql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
    select j.queue, i.gpu_name, count(*),
           count(*) * 3600.0 / greatest(sum(extract(epoch from j.finished_at - j.started_at)), 1e-3)
      from (select r.queue, r.instance_id, r.started_at, r.finished_at
              from gpuq.jobs r
             where r.finished_at > now() - p_since and r.status = 'succeeded' and r.started_at is not null
             order by r.finished_at desc
             limit 20000) as j
      join gpuq.instances i on i.id = j.instance_id
     where i.gpu_name is not null
     group by j.queue, i.gpu_name
     order by 1, 2
$$;

-- As 0003's, but queued, running and recently arrived jobs are read through indexes, not the whole history,
-- and without JIT (on a big table the planner's estimate passed its threshold: ~50 ms of compiling per call).
create or replace function gpuq.manager_queues(p_window interval default '20 minutes')
returns table (queue text, queued bigint, running bigint, oldest_wait_s double precision,
               recent_load double precision, arrivals_per_hour double precision, last_rent_at timestamptz)
language sql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
    with w as (
        select now() - p_window as since, extract(epoch from p_window) as secs
    ), live as (  -- queued and running jobs, each through its own partial index
        select j.queue,
               count(*) filter (where j.status = 'queued' and j.run_after <= now()) as queued,
               count(*) filter (where j.status = 'running') as running,
               extract(epoch from now() - min(greatest(j.run_after, j.created_at))
                   filter (where j.status = 'queued' and j.run_after <= now()))::double precision as oldest
          from (select queue, status, run_after, created_at from gpuq.jobs where status = 'queued'
                union all
                select queue, status, run_after, created_at from gpuq.jobs where status = 'running') as j
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
    ), arrivals as (  -- over an hour at least: a 20-minute count is too noisy to rank GPUs by
        -- a job created since then is still queued or running, or finished since then: the partial indexes
        -- and jobs_finished_idx find them all, without reading the whole history
        select a.queue, count(*) as n
          from (select queue, created_at from gpuq.jobs where status = 'queued'
                union all
                select queue, created_at from gpuq.jobs where status = 'running'
                union all
                select queue, created_at from gpuq.jobs
                 where finished_at > now() - greatest(p_window, interval '1 hour')) as a
         where a.created_at > now() - greatest(p_window, interval '1 hour')
         group by a.queue
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
           coalesce(b.secs, 0) / w.secs, coalesce(a.n, 0) * 3600.0 / greatest(w.secs, 3600), r.at
      from names n cross join w
      left join live l on l.queue = n.queue
      left join busy b on b.queue = n.queue
      left join arrivals a on a.queue = n.queue
      left join rents r on r.queue = n.queue
     order by n.queue
$$;
