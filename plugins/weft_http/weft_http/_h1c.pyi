# Types of the compiled fast path (_h1c.c); see h1.py for how its answers are used.

Head = bytes | bytearray | memoryview

def request(head: Head, /) -> tuple[str, str, str, str, int, bool] | None:
    """(method, target, version, host, content_length or -1, keep_alive), or None."""

def response(head: Head, /) -> tuple[str, int, str, int, int, bool] | None:
    """(version, status, reason, chunked, content_length or -1, keep_alive), or None."""
