-- gpuq 0007: the manager in a hostile market. Books that follow the provider's billing rules per state,
-- and the price a machine really bills when its listing contradicts the price it was rented at.
--
-- Books. Vast bills storage every second an instance exists, whatever its state, and the rest (the bid, or
-- the on-demand GPU price) only while it runs: not while it loads, once it is stopped (outbid) or exited,
-- nor ever for one that never starts. The books charged the full price from the rent to the destroy, and
-- ran 26% above the bill. Now:
--   instances.storage_dph   what the instance bills while not running (null: unknown, or a provider that
--                           bills the full price in every state: the books charge dph throughout, as before)
--   'billing' events        the provider's state as reconciliation saw it: details.state is 'loading'
--                           (the implicit state from the rent until the first such event), 'active'
--                           (running: the full price) or 'stopped' (stopped, exited: storage alone)
--   billing_segments()      a segment starts at every 'rented', 'price_changed' and 'billing' event and
--                           bills the price then in force while active, storage_dph otherwise
-- A state change is seen at the next tick, so a segment boundary lags it by up to a tick interval.
-- instances.dph stays the full price: it is what the caps commit to, whatever the state now.
--
-- Machine markups. When a listing shows an instance billing more than it was rented at (rented_dph(), not
-- instances.dph, which follows the listings), the machine's offers are priced that much higher from then
-- on (gpuq.machine_markups()), so the caps that shed the instance do not see the next offer on that machine
-- at the old price and rent it again.

alter table gpuq.instances
    add column storage_dph numeric(12, 6)
        constraint storage_dph_must_not_be_negative check (storage_dph >= 0);

create table gpuq.machine_markups (
    provider   text not null,
    machine_id text not null,
    markup_dph numeric(12, 6) not null constraint markup_dph_must_not_be_negative check (markup_dph >= 0),
    reason     text,
    at         timestamptz not null default now(),
    until      timestamptz not null,
    primary key (provider, machine_id)
);
alter table gpuq.machine_markups enable row level security;

---------------------------------------------------------------------------------------------------
-- Transitions.

-- What a live instance bills while not running, known at rent time (the offer's storage price).
create function gpuq.record_storage_dph(p_provider text, p_provider_instance_id text, p_storage_dph numeric)
returns boolean
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    if p_storage_dph is null or p_storage_dph < 0 or p_storage_dph > 999999 then
        raise exception using errcode = 'GQ400', message = 'a storage price must be a non-negative number';
    end if;
    update gpuq.instances set storage_dph = p_storage_dph
     where provider = p_provider and provider_instance_id = p_provider_instance_id and terminated_at is null
       and storage_dph is distinct from p_storage_dph;
    return found;
end $$;

-- The provider's billing state of a live instance as a listing showed it: 'loading', 'active' or
-- 'stopped' (see the top of this file), and its storage price when the provider knows it. A 'billing'
-- event is written only when the state changes. Answers whether it did.
create function gpuq.record_billing_state(
    p_instance_id bigint,
    p_state       text,
    p_storage_dph numeric default null,
    p_reason      text default null
) returns boolean
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    v_status  gpuq.instance_status;
    v_dph     numeric;
    v_storage numeric;
    v_last    text;
begin
    if p_state is null or p_state not in ('loading', 'active', 'stopped') then
        raise exception using errcode = 'GQ400',
            message = format('a billing state is loading, active or stopped, not %L', left(p_state, 100));
    end if;
    if p_storage_dph is not null and (p_storage_dph < 0 or p_storage_dph > 999999) then
        raise exception using errcode = 'GQ400', message = 'a storage price must be a non-negative number';
    end if;
    select status, dph, storage_dph into v_status, v_dph, v_storage
      from gpuq.instances where id = p_instance_id and terminated_at is null;
    if not found then
        return false;
    end if;
    if p_storage_dph is not null and v_storage is distinct from p_storage_dph then
        update gpuq.instances set storage_dph = p_storage_dph where id = p_instance_id;
        v_storage := p_storage_dph;
    end if;
    select e.details ->> 'state' into v_last
      from gpuq.instance_events e
     where e.instance_id = p_instance_id and e.event = 'billing'
     order by e.at desc, e.id desc
     limit 1;
    if coalesce(v_last, 'loading') = p_state then
        return false;
    end if;
    insert into gpuq.instance_events (instance_id, event, status, message, details)
    values (p_instance_id, 'billing', v_status, p_reason,
            jsonb_build_object('state', p_state,
                               'dph', case when p_state = 'active' or v_storage is null then v_dph
                                           else least(v_storage, v_dph) end));
    return true;
end $$;

-- A machine billed p_markup $/h more than the offer it was rented from said: price its offers that much
-- higher for p_for.
create function gpuq.record_machine_markup(
    p_provider   text,
    p_machine_id text,
    p_markup     numeric,
    p_reason     text default null,
    p_for        interval default '1 day'
) returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    if p_markup is null or p_markup < 0 or p_markup > 999999 then
        raise exception using errcode = 'GQ400', message = 'a markup must be a non-negative number';
    end if;
    insert into gpuq.machine_markups (provider, machine_id, markup_dph, reason, until)
    values (p_provider, p_machine_id, p_markup, left(p_reason, 2000), now() + p_for)
    on conflict (provider, machine_id) do update
       set markup_dph = excluded.markup_dph, reason = excluded.reason, at = now(), until = excluded.until;
end $$;

-- The price an instance was rented at (what its offer said, markup included): a listing above it means
-- the machine bills more than its offers say. (instances.dph follows the listings; this does not.)
create function gpuq.rented_dph(p_instance_id bigint) returns numeric
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    select e.dph from gpuq.instance_events e
     where e.instance_id = p_instance_id and e.event = 'rented'
     order by e.at, e.id
     limit 1
$$;

create function gpuq.machine_markups()
returns table (provider text, machine_id text, markup_dph numeric)
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    select m.provider, m.machine_id, m.markup_dph from gpuq.machine_markups m
     where m.until > now()
     order by m.provider, m.machine_id
$$;

---------------------------------------------------------------------------------------------------
-- Money: the segments follow the billing state (same signature as 0002's: its grants stand, and
-- spend_by_instance, spend_by_day, spend_today and spend_by_job follow).

create or replace function gpuq.billing_segments()
returns table (instance_id bigint, seg_start timestamptz, seg_end timestamptz, dph numeric)
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    with ev as (
        select e.instance_id, e.at, e.id,
               case when e.event in ('rented', 'price_changed') then e.dph end as price,
               case when e.event = 'billing' then e.details ->> 'state' end as state
          from gpuq.instance_events e
         where (e.event in ('rented', 'price_changed') and e.dph is not null)
            or (e.event = 'billing' and e.details ? 'state')
    ), numbered as (  -- the price and the state in force: the latest of each so far
        select ev.*, count(ev.price) over w as price_n, count(ev.state) over w as state_n
          from ev
        window w as (partition by ev.instance_id order by ev.at, ev.id)
    ), filled as (
        select n.instance_id, n.at, n.id,
               first_value(n.price) over (partition by n.instance_id, n.price_n order by n.at, n.id) as price,
               first_value(n.state) over (partition by n.instance_id, n.state_n order by n.at, n.id) as state
          from numbered n
    ), segments as (
        select f.instance_id, f.at, f.price, f.state,
               lead(f.at) over (partition by f.instance_id order by f.at, f.id) as next_at
          from filled f
    )
    select s.instance_id, s.at,
           greatest(s.at, coalesce(s.next_at, i.terminated_at, now())),
           case when i.storage_dph is null or s.state = 'active' then s.price
                else least(i.storage_dph, s.price) end
      from segments s join gpuq.instances i on i.id = s.instance_id
     where s.price is not null
$$;

---------------------------------------------------------------------------------------------------
-- Access.

revoke all on gpuq.machine_markups from public;
revoke execute on function
    gpuq.record_storage_dph(text, text, numeric),
    gpuq.record_billing_state(bigint, text, numeric, text),
    gpuq.record_machine_markup(text, text, numeric, text, interval),
    gpuq.rented_dph(bigint),
    gpuq.machine_markups()
from public;

do $$
declare
    r text;
begin
    foreach r in array array['anon', 'authenticated'] loop  -- Supabase's API roles, where they exist
        if exists (select 1 from pg_roles where rolname = r) then
            execute format('revoke all on gpuq.machine_markups from %I', r);
        end if;
    end loop;
    if exists (select 1 from pg_roles where rolname = 'gpuq_manager') then
        grant execute on function
            gpuq.record_storage_dph(text, text, numeric),
            gpuq.record_billing_state(bigint, text, numeric, text),
            gpuq.record_machine_markup(text, text, numeric, text, interval),
            gpuq.rented_dph(bigint),
            gpuq.machine_markups()
        to gpuq_manager;
    end if;
end $$;
