"""Which storage errors say nothing about the data: the connection, the server or throttling.

fsspec backends report failures as ``OSError`` (s3fs turns a 5xx ``ClientError`` into
``OSError(EIO)`` with the ``ClientError`` as its cause), so the type alone cannot tell a missing file
(the sample's problem: an error row) from a storage node that is briefly down (retry the shard). This
walks the exception chain and looks at what the transport said: connection and timeout errors,
HTTP 5xx and 429, and the throttling codes object stores send.
"""

from __future__ import annotations

import errno

TRANSIENT_ERRNOS = frozenset(
    {
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EPIPE,
        errno.EAGAIN,
        errno.EBUSY,  # s3fs: SlowDown, ServiceUnavailable, 503, OperationAborted
        errno.EREMOTEIO,  # s3fs: InternalError, 500
    }
)
TRANSIENT_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "InternalError",
        "RequestLimitExceeded",
        "RequestThrottled",
        "InternalServerError",
        "TooManyRequests",
        "TooManyRequestsException",
        "503",
        "500",
        "502",
        "504",
    }
)
# Transport errors by module prefix and class name, so neither botocore nor aiohttp must be installed.
_TRANSPORT_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ProxyConnectionError",
        "ClientConnectionError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "ClientOSError",
        "ClientPayloadError",
    }
)
def one_is_transient(exc: BaseException) -> bool:
    """This one exception (not its causes) is a connection, timeout, 5xx or throttling failure."""
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if type(exc).__name__ in _TRANSPORT_NAMES and type(exc).__module__.split(".")[0] in {
        "botocore",
        "aiohttp",
        "urllib3",
        "requests",
        "httpx",
        "aiobotocore",
    }:
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = str(response.get("Error", {}).get("Code", ""))
        if (isinstance(status, int) and (status >= 500 or status == 429)) or code in TRANSIENT_CODES:
            return True
    status = getattr(exc, "status", None)  # aiohttp ClientResponseError, HTTP file systems
    return isinstance(status, int) and (status >= 500 or status == 429)


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` or anything it was raised from is a connection, timeout, 5xx or throttling
    failure. The whole chain counts: fsspec's HTTP backend reports a 503 or a refused connection as
    ``FileNotFoundError`` raised from the real cause, while a real 404 has no transient cause."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if one_is_transient(current):
            return True
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return False
