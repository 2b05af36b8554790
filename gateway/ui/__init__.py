"""The admin web UI at ``/gateway/ui``: server-rendered pages over the admin API's own functions.

``routes`` serves the pages (keys, usage, tasks, accounts), ``session`` signs the session cookie and CSRF tokens,
``chart`` lays out the usage bar chart. The sign-in form checks the token with the admin API's own ``AdminToken``,
so wrong tokens count against the same guessing limiter. The UI
exists only when the admin token is set, exactly like the admin API.
"""
