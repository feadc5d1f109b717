"""The operator's dashboard: queues, fleet, jobs and money on one live page, with controls.

`gpuq dashboard` serves it (and `gpuq manager run` beside its loop when GPUQ_DASHBOARD_PORT is set). Every
figure comes from gpuq's SQL functions (sql/migrations/0009_dashboard.sql) and every control is one SQL
transition that records who acted. board.py reads and acts, app.py is the web app (Starlette), auth.py the
users and their rights, server.py starts it.
"""
