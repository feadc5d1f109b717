-- gpuq 0012: where idle money went, by reason (issue 12: no rented minute idles unseen). gpuq.idle_by_reason()
-- says why each instance is not running a job now; this keeps the account. Each tick the manager records, for
-- every live instance not running a job, the time since it last looked and the reason it gave. Time beyond
-- two ticks with no look (the manager was not running) is booked as unseen, not to the reason seen at the end.

create table gpuq.idle_ledger (
    id          bigint generated always as identity primary key,
    at          timestamptz not null default now(),
    instance_id bigint not null references gpuq.instances (id) on delete cascade,
    reason      text not null constraint idle_reason_must_be_short check (char_length(reason) between 1 and 200),
    seconds     double precision not null constraint idle_seconds_must_not_be_negative check (seconds >= 0),
    usd         numeric(14, 6) not null constraint idle_usd_must_not_be_negative check (usd >= 0)
);
create index idle_ledger_at_idx on gpuq.idle_ledger (at);
create index idle_ledger_instance_idx on gpuq.idle_ledger (instance_id, at);

-- p_instance_ids[k] is idle for p_reasons[k] (the manager's refined reason); p_tick_seconds is how often the
-- manager looks. Each instance's span runs from the latest of: when its reason began, its previous record,
-- the manager's previous tick. Answers the rows written. Rows older than 35 days are dropped.
create function gpuq.record_idle(p_instance_ids bigint[], p_reasons text[], p_tick_seconds double precision)
returns integer
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    v_last_tick timestamptz := (select last_tick_at from gpuq.manager_ticks);
    v_written integer;
begin
    if p_tick_seconds is null or not p_tick_seconds between 1 and 86400 then
        raise exception 'p_tick_seconds must be between 1 and 86400, got %', p_tick_seconds
            using errcode = '22023';
    end if;
    if coalesce(cardinality(p_instance_ids), 0) <> coalesce(cardinality(p_reasons), 0) then
        raise exception 'p_instance_ids and p_reasons must be the same length' using errcode = '22023';
    end if;
    delete from gpuq.idle_ledger where at < now() - interval '35 days';
    with asked as (
        select a.instance_id, left(a.reason, 200) as reason
          from unnest(p_instance_ids, p_reasons) as a (instance_id, reason)
         where a.instance_id is not null and coalesce(a.reason, '') <> ''
    ), spans as (
        select a.instance_id, a.reason, i.dph,
               extract(epoch from now() - greatest(r.since,
                   (select max(l.at) from gpuq.idle_ledger l where l.instance_id = a.instance_id),
                   v_last_tick))::double precision as gap
          from asked a
          join gpuq.idle_by_reason() r on r.instance_id = a.instance_id  -- live and not running a job, now
          join gpuq.instances i on i.id = a.instance_id
    ), parts as (
        select instance_id, reason, dph, least(gap, 2 * p_tick_seconds) as seconds from spans where gap > 0
        union all
        select instance_id, 'unseen: the manager did not look', dph, gap - 2 * p_tick_seconds
          from spans where gap > 2 * p_tick_seconds
    )
    insert into gpuq.idle_ledger (instance_id, reason, seconds, usd)
    select instance_id, reason, seconds, round((seconds * coalesce(dph, 0) / 3600)::numeric, 6) from parts;
    get diagnostics v_written = row_count;
    return v_written;
end
$$;

-- Idle instance-hours and their cost per reason since p_since, the dearest first.
create function gpuq.idle_hours_by_reason(p_since timestamptz)
returns table (reason text, instances bigint, hours double precision, usd numeric)
language sql stable security definer set search_path = pg_catalog, pg_temp set jit = off as $$
    select l.reason, count(distinct l.instance_id), sum(l.seconds) / 3600, sum(l.usd)
      from gpuq.idle_ledger l
     where l.at >= p_since
     group by l.reason
     order by 4 desc, 1
$$;

revoke all on gpuq.idle_ledger from public;
revoke execute on function gpuq.record_idle(bigint[], text[], double precision),
    gpuq.idle_hours_by_reason(timestamptz) from public;

do $$
begin
    if exists (select 1 from pg_roles where rolname = 'gpuq_manager') then
        grant execute on function gpuq.record_idle(bigint[], text[], double precision),
            gpuq.idle_hours_by_reason(timestamptz) to gpuq_manager;
    end if;
end
$$;
