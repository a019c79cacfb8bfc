"""Find a session and learn why it is not found, in one round trip to
PostgreSQL, with the `sessiond_lookup` function `sessiond migrate` makes.

    from lookup import lookup, not_found_detail

    found, reason, state = lookup(conn, session_id)      # conn: a psycopg connection
    if not found:
        raise HTTPException(404, not_found_detail(reason))

`reason` is one of:

    ok              the session is live (creating, active or paused)
    ended           it was stopped, or failed
    deleted         it was deleted (found only with include_deleted=True)
    never_existed   no row, and no trace of one in sessiond's audit trail
    invalid_format  the id cannot be a session id (sessions.id_pattern)
    unknown_state   the row's state is a value the mapping does not list

The function uses the table's id index, so it costs what a lookup by primary
key costs. Count the reasons in your controller's `counters.lookups` block and
sessiond re-exports them (`sessiond_app_lookups_total`).

Try it against a database sessiond has migrated:

    python lookup.py --dsn postgresql://app@db/app exec_20261121_095958_1a2b3c4d
"""

import argparse
import json
import sys

# sessiond's schema (database.schema); the function lives there.
SCHEMA = "sessiond"

MESSAGES = {
    "ended": "Session has ended",
    "deleted": "Session was deleted",
    "never_existed": "Session not found",
    "invalid_format": "Not a session id",
    "unknown_state": "Session is in an unknown state",
}


def lookup(conn, session_id, include_deleted=False, schema=SCHEMA):
    """(found, reason, state) for `session_id`: one statement, no transaction
    of its own (it runs in the caller's, if any)."""
    quoted = '"' + schema.replace('"', '""') + '"'
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT found, reason, state FROM {quoted}.sessiond_lookup(%s, %s)",
            (session_id, include_deleted),
        )
        row = cur.fetchone()
    return bool(row[0]), row[1], row[2]


def not_found_detail(reason):
    """A 404 body that says why, for the application's own API."""
    return {"detail": MESSAGES.get(reason, "Session not found"), "reason": reason}


def main(argv=None):
    import psycopg

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", required=True, help="a libpq connection string or URL")
    parser.add_argument("--schema", default=SCHEMA, help="sessiond's schema (database.schema)")
    parser.add_argument("--include-deleted", action="store_true")
    parser.add_argument("session_id")
    args = parser.parse_args(argv)
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        found, reason, state = lookup(conn, args.session_id, args.include_deleted, args.schema)
    print(json.dumps({"found": found, "reason": reason, "state": state}))
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
