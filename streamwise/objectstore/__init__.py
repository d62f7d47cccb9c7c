"""Object store shim: values in node-local shared memory, passed between processes by name.

How the parts fit: ``_session`` names a driver's files in /dev/shm and holds the rules
that free them; ``_store`` is one process's view (holds on segments, read-only
mappings, writing new segments); ``_payload`` lays a value out as an envelope of
parts (pickle protocol 5, large buffers out of band); ``ref`` is the public
``ObjectRef`` / ``put`` / ``get``; ``calls`` is how handle calls carry arguments and
results, by reference or by value; ``_process`` ties a process to its session.
"""

from streamwise.objectstore._process import close_session, join_session, reclaim, session_name, usage
from streamwise.objectstore._session import cleanup_stale
from streamwise.objectstore.ref import ObjectRef, get, put

__all__ = [
    "ObjectRef",
    "cleanup_stale",
    "close_session",
    "get",
    "join_session",
    "put",
    "reclaim",
    "session_name",
    "usage",
]
