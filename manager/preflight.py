"""Checks before the manager rents anything: a rented host gets a database login of its own that can do a
worker's work and nothing more, and a gpuq it can install exactly. Run by `gpuq manager tick` and `run`
at start; each problem stops the manager with one line naming it.
"""

from __future__ import annotations

import psycopg

from gpuq.client import Client
from gpuq.db import connect, redact
from manager.bootstrap import NO_WORKER_LOGIN, LaunchRefused, install_env
from manager.config import ManagerSettings

WORKER_ROLE = "gpuq_worker"

# What a login may be, read from the catalog as the login itself (so what is checked is what hosts get).
_ROLE_FACTS = """
select r.rolname as name, r.rolsuper as superuser, r.rolbypassrls as bypassrls,
       r.rolcreaterole as createrole, r.rolcreatedb as createdb, r.rolreplication as replication,
       array(select m.rolname::text from pg_roles m
              where m.oid <> r.oid and pg_has_role(r.oid, m.oid, 'member') order by 1) as member_of,
       exists(select 1 from pg_roles w where w.rolname = %(role)s) as role_exists,
       exists(select 1 from pg_roles w where w.rolname = %(role)s and pg_has_role(r.oid, w.oid, 'usage'))
           as inherits,
       array_remove(array[
           case when exists(select 1 from pg_database
                            where datname = current_database() and datdba = r.oid) then 'the database' end,
           case when exists(select 1 from pg_namespace
                            where nspname = 'gpuq' and nspowner = r.oid) then 'schema gpuq' end,
           case when exists(select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace
                            where n.nspname = 'gpuq' and c.relowner = r.oid) then 'tables in schema gpuq' end,
           case when exists(select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                            where n.nspname = 'gpuq' and p.proowner = r.oid) then 'functions in schema gpuq'
           end], null) as owns
  from pg_roles r where r.rolname = current_user
"""


def worker_login_problems(worker_url: str, client: Client) -> list[str]:
    """What is wrong with `worker_url` as the login rented hosts get (empty: nothing). Connects with it."""
    try:
        with connect(worker_url, client.settings) as conn:
            facts = conn.execute(_ROLE_FACTS, {"role": WORKER_ROLE}).fetchone()
    except psycopg.Error as e:
        return [f"cannot log in with it: {redact(' '.join(str(e).split()))}"]
    assert facts is not None  # current_user is always a role
    manager_role = client.call("select current_user::text as name")[0]["name"]
    problems = []
    if facts["name"] == manager_role:
        problems.append("it is the manager's own role (DATABASE_URL)")
    for flag in ("superuser", "bypassrls", "createrole", "createdb", "replication"):
        if facts[flag]:
            problems.append(f"it is {flag.upper()}")
    if not facts["role_exists"]:
        problems.append(f"role {WORKER_ROLE} does not exist (run `gpuq migrate`)")
    elif WORKER_ROLE not in facts["member_of"]:
        problems.append(f"it is not a member of {WORKER_ROLE}")
    elif not facts["inherits"]:
        problems.append(f"it does not inherit {WORKER_ROLE}'s privileges (NOINHERIT)")
    others = [m for m in facts["member_of"] if m != WORKER_ROLE]
    if others and not facts["superuser"]:  # a superuser is a member of every role: said already
        problems.append(f"it is also a member of {', '.join(others)}")
    if facts["owns"]:
        problems.append(f"it owns {', '.join(facts['owns'])}")
    return problems


def check_before_renting(ms: ManagerSettings, client: Client) -> None:
    """Raise SystemExit naming what is wrong with what rented hosts would get; nothing to check when
    every queue runs on local workers. Writes nothing (a dry run runs it too): the first rent puts the
    manager's wheel in storage and checks its URL (bootstrap.install_env)."""
    if all(q.provider == "local" for q in ms.launch.values()):
        return
    url = ms.worker_database_url
    if not url:
        raise SystemExit(f"gpuq manager: {NO_WORKER_LOGIN}")
    problems = worker_login_problems(url, client)
    if problems:
        raise SystemExit(
            f"gpuq manager: GPUQ_WORKER_DATABASE_URL ({redact(url)}) must be a login that is a member of "
            f"{WORKER_ROLE} and nothing more: {'; '.join(problems)}"
        )
    try:
        install_env(ms, resolve=False)
    except LaunchRefused as e:
        raise SystemExit(f"gpuq manager: {e}") from None
