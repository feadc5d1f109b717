-- 0005: the manager's last tick, so that a rented worker can tell when no manager is looking after it
-- (a cron that stopped, a manager host that is down). An idle instance that has seen no tick for its
-- orphan timeout destroys itself rather than bill unseen (worker/main.py, scripts/onstart.sh).

create table gpuq.manager_ticks (
    singleton    boolean primary key default true check (singleton),  -- one row
    last_tick_at timestamptz not null
);
alter table gpuq.manager_ticks enable row level security;

-- Called by every tick (and dry run: it looks after the fleet as much as it decides).
create function gpuq.record_tick() returns void
language sql security definer set search_path = pg_catalog, pg_temp as $$
    insert into gpuq.manager_ticks (singleton, last_tick_at) values (true, now())
    on conflict (singleton) do update set last_tick_at = excluded.last_tick_at;
$$;

-- Seconds since the manager's last tick; null when no manager ever ticked on this database.
create function gpuq.manager_silence_seconds() returns double precision
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    select extract(epoch from now() - last_tick_at)::double precision from gpuq.manager_ticks;
$$;

revoke all on gpuq.manager_ticks from public;
revoke execute on function gpuq.record_tick(), gpuq.manager_silence_seconds() from public;

do $$
begin
    if exists (select 1 from pg_roles where rolname = 'anon') then
        execute 'revoke all on gpuq.manager_ticks from anon';
    end if;
    if exists (select 1 from pg_roles where rolname = 'authenticated') then
        execute 'revoke all on gpuq.manager_ticks from authenticated';
    end if;
    if exists (select 1 from pg_roles where rolname = 'gpuq_manager') then
        grant execute on function gpuq.record_tick(), gpuq.manager_silence_seconds() to gpuq_manager;
    end if;
    if exists (select 1 from pg_roles where rolname = 'gpuq_worker') then
        grant execute on function gpuq.manager_silence_seconds() to gpuq_worker;
    end if;
end $$;
