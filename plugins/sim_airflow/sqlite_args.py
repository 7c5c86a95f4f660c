"""Connect arguments for a SQLite metadata database (the local launcher's).

SQLite takes one writer at a time; Python's default wait for the lock is 5 s, which a scheduler,
an api-server, a dag-processor and a CLI command writing at once exceed on a busy machine
("database is locked"). Waiting longer makes them take turns instead of failing.
"""

CONNECT_ARGS = {"timeout": 60}
