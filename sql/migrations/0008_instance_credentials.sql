-- gpuq 0008: each live instance's own short-lived storage credentials.
--
-- Before this, a rented host got the owner's long-lived storage keys (S3 keys, Supabase's service-role key)
-- in its environment, the same on every host and valid after the host was gone. Now the manager issues each
-- live instance credentials of its own (manager/credentials.py: S3 keys from STS AssumeRole with a session
-- policy, or a Supabase Storage JWT), scoped to what that instance does and valid for a short time, renews
-- them each tick before they expire, and stops once the instance ends. The worker reads them with its
-- instance secret (gpuq.instance_credentials), so they never pass through the host's environment.
--
-- * set_instance_credentials (manager) stores them for a live instance only: one that still has a secret
--   and has not ended. It answers false, storing nothing, for any other.
-- * An instance that ends or gives up its secret (destroyed, lost, failed, revoked, deregistered) loses its
--   credentials at once (a trigger deletes them), whichever function ended it.
-- * instance_credentials (worker) answers the caller's own instance's unexpired credentials, proven by its
--   secret (GQ401 otherwise, as every worker function).
-- Credentials already issued stay valid at their provider until they expire; what ends here is their
-- renewal and the host's way of reading them.

create table gpuq.instance_credentials (
    instance_id bigint not null references gpuq.instances (id) on delete cascade,
    kind        text not null
        constraint kind_must_be_s3_or_supabase check (kind in ('s3', 'supabase')),
    credentials jsonb not null
        constraint credentials_must_be_a_json_object check (jsonb_typeof(credentials) = 'object')
        constraint credentials_must_be_at_most_16_kib check (pg_column_size(credentials) <= 16384),
    issued_at   timestamptz not null default now(),
    expires_at  timestamptz not null,
    constraint expires_at_must_be_after_issued_at check (expires_at > issued_at),
    primary key (instance_id, kind)
);
alter table gpuq.instance_credentials enable row level security;
revoke all on gpuq.instance_credentials from public;

-- An instance's credentials go with its secret: every way an instance ends clears the secret (0006's
-- trigger, deregister_instance, revoke_instance, record_destroy).
create function gpuq._drop_ended_credentials() returns trigger
language plpgsql as $$
begin
    delete from gpuq.instance_credentials where instance_id = new.id;
    return null;
end $$;

create trigger instances_drop_ended_credentials after update on gpuq.instances
    for each row when (old.secret_sha256 is not null and new.secret_sha256 is null)
    execute function gpuq._drop_ended_credentials();

-- The manager's side. Live instances labelled p_label_prefix… whose credentials of p_kind are missing or
-- expire within p_renew_before, with the queues they serve (what the credentials are scoped to).
create function gpuq.instance_credentials_due(p_kind text, p_label_prefix text, p_renew_before interval)
returns table (instance_id bigint, queues text[], expires_at timestamptz)
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    select i.id, i.queues, c.expires_at
      from gpuq.instances i
      left join gpuq.instance_credentials c on c.instance_id = i.id and c.kind = p_kind
     where i.secret_sha256 is not null
       and (i.secret_expires_at is null or i.secret_expires_at > now())
       and i.status in ('requested', 'booting', 'idle', 'busy', 'draining')
       and starts_with(i.label, p_label_prefix)
       and (c.expires_at is null or c.expires_at < now() + p_renew_before)
     order by i.id
$$;

-- Store (or replace) an instance's credentials of p_kind. Answers false, storing nothing, when the
-- instance is not live (ended, or without a secret): credentials are never handed to what has ended.
create function gpuq.set_instance_credentials(p_instance_id bigint, p_kind text, p_credentials jsonb,
                                              p_expires_at timestamptz)
returns boolean
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    i gpuq.instances;
begin
    -- FOR SHARE: an update that ends the instance waits for this transaction, or this one sees it ended
    select * into i from gpuq.instances where id = p_instance_id for share;
    if not found then
        raise exception using errcode = 'GQ404', message = format('instance %s does not exist', p_instance_id);
    end if;
    if p_expires_at is null or p_expires_at <= now() then
        raise exception using errcode = 'GQ400', message = 'credentials must expire in the future';
    end if;
    if i.secret_sha256 is null or (i.secret_expires_at is not null and i.secret_expires_at <= now())
       or i.status not in ('requested', 'booting', 'idle', 'busy', 'draining') then
        return false;
    end if;
    insert into gpuq.instance_credentials (instance_id, kind, credentials, issued_at, expires_at)
    values (p_instance_id, p_kind, p_credentials, now(), p_expires_at)
    on conflict (instance_id, kind) do update
       set credentials = excluded.credentials, issued_at = excluded.issued_at, expires_at = excluded.expires_at;
    return true;
end $$;

-- The worker's side: its own instance's unexpired credentials, one row per kind.
create function gpuq.instance_credentials(p_secret text)
returns table (kind text, credentials jsonb, issued_at timestamptz, expires_at timestamptz)
language plpgsql stable security definer set search_path = pg_catalog, pg_temp as $$
declare
    i gpuq.instances;
begin
    i := gpuq._instance_for(p_secret);
    return query
    select c.kind, c.credentials, c.issued_at, c.expires_at
      from gpuq.instance_credentials c
     where c.instance_id = i.id and c.expires_at > now()
     order by c.kind;
end $$;

---------------------------------------------------------------------------------------------------
-- Access (as in 0006: each function revoked from PUBLIC by name; `gpuq migrate` sweeps anon and
-- authenticated after every run).

revoke execute on function
    gpuq._drop_ended_credentials(),
    gpuq.instance_credentials_due(text, text, interval),
    gpuq.set_instance_credentials(bigint, text, jsonb, timestamptz),
    gpuq.instance_credentials(text)
from public;

do $$
begin
    if exists (select 1 from pg_roles where rolname = 'gpuq_worker') then
        grant execute on function gpuq.instance_credentials(text) to gpuq_worker;
    end if;
    if exists (select 1 from pg_roles where rolname = 'gpuq_manager') then
        grant execute on function
            gpuq.instance_credentials_due(text, text, interval),
            gpuq.set_instance_credentials(bigint, text, jsonb, timestamptz)
        to gpuq_manager;
    end if;
end $$;
