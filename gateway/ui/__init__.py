"""The admin web UI at ``/gateway/ui``: server-rendered pages over the admin API's own functions.

``routes`` serves the pages (keys, usage, tasks), ``session`` signs the session cookie and CSRF tokens,
``guard`` slows down admin-token guessing at the sign-in form, ``chart`` lays out the usage bar chart. The UI
exists only when the admin token is set, exactly like the admin API.
"""
