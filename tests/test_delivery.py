"""The response-code policy (DESIGN.md §5) against every answer shape of the API reference.

`classify` is driven with hand-built `httpx.Response`s; `ApiClient` and `Deliverer` run
over `httpx.MockTransport`, so retries, Retry-After, bisection and key rotation are
exercised through the real HTTP client without a server.
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from syncd._wire import OneWriteTransport
from syncd.config import ApiConfig
from syncd.delivery import (
    Ack,
    ApiClient,
    AuthError,
    ConfigurationError,
    Deliverer,
    RateLimiter,
    RejectedError,
    RetryableError,
    ThrottledError,
    TokenSource,
    classify,
)

URL = "https://campaign.example/v1/datastores/contacts"


def response(status: int, body: Any = None, *, headers: dict[str, str] | None = None, content: bytes | None = None) -> httpx.Response:
    if content is None:
        content = b"" if body is None else orjson.dumps(body)
    return httpx.Response(status, content=content, headers=headers, request=httpx.Request("POST", URL))


# ---------------------------------------------------------------------------- classify


def test_ack_with_trans_id_and_correlation_id() -> None:
    ack = classify(response(200, {"statuscode": 0, "trans_id": "t-1", "result": {"correlation_id": "c-1", "status": 0}}))
    assert ack == Ack(200, "t-1", "c-1", None)


def test_ack_without_result_for_an_unknown_datastore() -> None:
    ack = classify(response(200, {"statuscode": 0, "trans_id": "t-2"}))
    assert ack.trans_id == "t-2" and ack.correlation_id is None


def test_200_with_1010_is_not_an_ack_but_retryable() -> None:
    with pytest.raises(RetryableError) as caught:
        classify(response(200, {"statuscode": 1010, "description": "The request was not processed."}))
    assert not isinstance(caught.value, ThrottledError)
    assert (caught.value.http_status, caught.value.api_code) == (200, 1010)
    assert "not processed" in caught.value.description


def test_1010_inside_result_is_retryable() -> None:
    with pytest.raises(RetryableError) as caught:
        classify(response(200, {"result": {"status": 1010, "description": "not processed"}}))
    assert caught.value.api_code == 1010


@pytest.mark.parametrize(("status", "code"), [(401, 430), (498, 498), (401, None)])
def test_auth_failures(status: int, code: int | None) -> None:
    body = {"statuscode": code, "description": "Authorization failed"} if code else None
    with pytest.raises(AuthError) as caught:
        classify(response(status, body))
    assert caught.value.http_status == status
    assert caught.value.outcome == "auth_error"


def test_405_is_a_configuration_error_pointing_at_the_url() -> None:
    with pytest.raises(ConfigurationError) as caught:
        classify(response(405, {"statuscode": 405, "description": "Method not supported"}))
    assert "api.url" in str(caught.value)
    assert caught.value.outcome == "config_error"


def test_404_is_a_configuration_error_not_retried() -> None:
    with pytest.raises(ConfigurationError):
        classify(response(404, content=b"<html>not found</html>"))


def test_429_carries_retry_after_in_seconds() -> None:
    with pytest.raises(ThrottledError) as caught:
        classify(response(429, {"statuscode": 429, "description": "Too many requests"}, headers={"Retry-After": "2.5"}))
    assert caught.value.retry_after == 2.5
    assert isinstance(caught.value, RetryableError)


def test_429_carries_retry_after_as_http_date() -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    with pytest.raises(ThrottledError) as caught:
        classify(response(429, {"statuscode": 429}, headers={"Retry-After": format_datetime(when, usegmt=True)}))
    assert 25 <= caught.value.retry_after <= 31


def test_429_with_retry_after_in_the_past_or_garbage() -> None:
    past = format_datetime(datetime.now(UTC) - timedelta(minutes=5), usegmt=True)
    with pytest.raises(ThrottledError) as caught:
        classify(response(429, None, headers={"Retry-After": past}))
    assert caught.value.retry_after == 0
    with pytest.raises(ThrottledError) as caught:
        classify(response(429, None, headers={"Retry-After": "soon"}))
    assert caught.value.retry_after is None
    with pytest.raises(ThrottledError) as caught:
        classify(response(429, None))
    assert caught.value.retry_after is None


@pytest.mark.parametrize(
    ("status", "code"),
    [(499, 499), (400, 1001), (200, 1001), (400, 1002), (200, 1002), (413, 413), (413, None)],
)
def test_rejections_that_name_bad_records(status: int, code: int | None) -> None:
    body = {"statuscode": code, "description": "bad"} if code else None
    with pytest.raises(RejectedError) as caught:
        classify(response(status, body))
    assert caught.value.outcome == "rejected"


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_are_retryable(status: int) -> None:
    with pytest.raises(RetryableError) as caught:
        classify(response(status, {"statuscode": status, "description": "Internal server error"} if status == 500 else None))
    assert caught.value.http_status == status
    assert not isinstance(caught.value, ThrottledError)


def test_non_json_bodies() -> None:
    # A proxy's HTML error page: the status decides.
    with pytest.raises(RetryableError):
        classify(response(502, content=b"<html><body>Bad Gateway</body></html>"))
    # A 200 that is not an ACK may or may not have been taken: retry, never count it as sent.
    with pytest.raises(RetryableError) as caught:
        classify(response(200, content=b"OK"))
    assert "unrecognised" in caught.value.description
    with pytest.raises(RetryableError):
        classify(response(200, content=b"[1, 2]"))
    with pytest.raises(RetryableError):
        classify(response(200, content=b""))


# ---------------------------------------------------------------------------- over HTTP


def api_config(tmp_path: Path, **overrides: Any) -> ApiConfig:
    token_file = tmp_path / "api-token"
    if not token_file.exists():
        token_file.write_text("key-1\n")
    settings: dict[str, Any] = {
        "url": URL,
        "token_file": token_file,
        "timeout_s": 1,
        "requests_per_second": 0,
        "max_attempts": 4,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
    }
    settings.update(overrides)
    return ApiConfig(**settings)


class Api:
    """A scripted endpoint: `answers` are popped per request; then `default` answers."""

    def __init__(self, default: Any = None) -> None:
        self.answers: list[Any] = []
        self.default = default or self.ack
        self.requests: list[dict[str, Any]] = []

    @staticmethod
    def ack(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        return httpx.Response(200, json={"statuscode": 0, "trans_id": f"t{len(body['records'])}", "result": {"correlation_id": "c", "status": 0}})

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        self.requests.append({"auth": request.headers.get("authorization"), "records": body["records"], "body": body})
        answer = self.answers.pop(0) if self.answers else self.default
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return answer(request, body)
        return answer


def deliverer(tmp_path: Path, api: Api, **overrides: Any) -> tuple[Deliverer, list[float]]:
    config = api_config(tmp_path, **overrides)
    client = ApiClient(config, TokenSource(config), RateLimiter(0))
    client._http = httpx.Client(transport=httpx.MockTransport(api), headers={"content-type": "application/json"})
    slept: list[float] = []
    return Deliverer(client, config, sleep=slept.append), slept


def records(n: int, bad: set[int] = frozenset()) -> list[dict[str, Any]]:
    return [{"msisdn": "" if i in bad else f"+4420794600{i:02d}", "firstname": f"F{i}"} for i in range(n)]


def reject_missing_msisdn(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
    if any(not r.get("msisdn") for r in body["records"]):
        return httpx.Response(400, json={"statuscode": 1002, "description": "Mandatory field missing: msisdn"})
    return Api.ack(request, body)


def test_client_sends_the_reference_request(tmp_path: Path) -> None:
    api = Api()
    sender, _ = deliverer(tmp_path, api)
    result = sender.deliver("1466", "1499", records(2))
    assert result.complete and result.acked == [0, 1]
    (sent,) = api.requests
    assert sent["auth"] == "Bearer key-1"
    assert sent["body"] == {"datastore-id": "1466", "feed-id": "1499", "records": records(2)}
    (push,) = result.pushes
    assert (push.outcome, push.http_status, push.api_code, push.trans_id, push.correlation_id, push.attempt) == (
        "ack", 200, 0, "t2", "c", 1,
    )


@pytest.mark.parametrize(
    "fault",
    [
        httpx.Response(500, json={"statuscode": 500, "description": "Internal server error"}),
        httpx.Response(503, content=b"busy"),
        httpx.Response(200, json={"statuscode": 1010, "description": "The request was not processed."}),
        httpx.ConnectError("connection refused"),
        httpx.ReadTimeout("timed out"),
        httpx.RemoteProtocolError("server disconnected"),
    ],
    ids=["500", "503", "1010", "connect-error", "timeout", "dropped"],
)
def test_retryable_failures_are_retried_with_backoff_and_recorded(tmp_path: Path, fault: Any) -> None:
    api = Api()
    api.answers = [fault, fault]
    sender, slept = deliverer(tmp_path, api)
    result = sender.deliver("1466", "1499", records(3))
    assert result.complete and result.acked == [0, 1, 2]
    assert len(api.requests) == 3
    assert [p.outcome for p in result.pushes] == ["retry", "retry", "ack"]
    assert [p.attempt for p in result.pushes] == [1, 2, 3]
    # Full jitter under an exponential ceiling: never above backoff_max_s.
    assert len(slept) == 2 and all(0 <= s <= 0.05 for s in slept)


def test_retries_give_up_after_max_attempts_and_leave_the_batch_pending(tmp_path: Path) -> None:
    api = Api(default=httpx.Response(500, json={"statuscode": 500}))
    sender, slept = deliverer(tmp_path, api, max_attempts=3)
    result = sender.deliver("1466", "1499", records(3))
    assert not result.complete and result.acked == []
    assert isinstance(result.failure, RetryableError)
    assert len(api.requests) == 3 and len(result.pushes) == 3 and len(slept) == 2


def test_retry_after_is_honoured(tmp_path: Path) -> None:
    api = Api()
    api.answers = [
        httpx.Response(429, json={"statuscode": 429}, headers={"Retry-After": "3"}),
        httpx.Response(429, json={"statuscode": 429}, headers={"Retry-After": format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)}),
    ]
    sender, slept = deliverer(tmp_path, api)
    result = sender.deliver("1466", "1499", records(1))
    assert result.complete
    assert slept[0] == 3  # far above backoff_max_s: the server's word wins
    assert 15 <= slept[1] <= 20
    assert [(p.http_status, p.api_code, p.outcome) for p in result.pushes[:2]] == [(429, 429, "retry")] * 2


def test_backoff_grows_exponentially_up_to_the_ceiling(tmp_path: Path) -> None:
    api = Api(default=httpx.Response(500, json={"statuscode": 500}))
    sender, slept = deliverer(tmp_path, api, max_attempts=12, backoff_base_s=0.01, backoff_max_s=0.08)
    for _ in range(30):
        sender.deliver("1466", "1499", records(1))
    # attempt n sleeps uniform(0, min(max, base * 2**(n-1))): 0.01, 0.02, 0.04, 0.08, 0.08, ...
    per_attempt = [slept[i::11] for i in range(11)]
    assert max(per_attempt[0]) <= 0.01
    assert max(per_attempt[1]) <= 0.02
    assert max(per_attempt[2]) <= 0.04
    assert max(max(s) for s in per_attempt[3:]) <= 0.08
    assert max(max(s) for s in per_attempt[3:]) > 0.04  # the ceiling is reached, jitter spreads below it


@pytest.mark.parametrize("bad", [{0}, {9}, {3, 4}, {0, 5, 9}, set(range(10))])
def test_bisection_isolates_exactly_the_rejected_records(tmp_path: Path, bad: set[int]) -> None:
    api = Api(default=reject_missing_msisdn)
    sender, _ = deliverer(tmp_path, api)
    batch = records(10, bad)
    result = sender.deliver("1466", "1499", batch)
    assert result.complete
    assert sorted(result.acked) == sorted(set(range(10)) - bad)
    assert sorted(i for i, _ in result.rejected) == sorted(bad)
    assert all(isinstance(e, RejectedError) and e.api_code == 1002 for _, e in result.rejected)
    # Every good record was acknowledged exactly once.
    acked = [r["msisdn"] for req in api.requests if all(r["msisdn"] for r in req["records"]) for r in req["records"]]
    assert sorted(acked) == sorted(batch[i]["msisdn"] for i in range(10) if i not in bad)
    # Every attempt, the rejected ones included, is recorded.
    assert len(result.pushes) == len(api.requests)
    assert {p.outcome for p in result.pushes} <= {"ack", "rejected"}
    # Each acknowledged record names the push whose ACK carried it (its part's trans_id).
    for index, carrier in zip(result.acked, result.ack_pushes(), strict=True):
        (request,) = [api.requests[n] for n, p in enumerate(result.pushes) if p is carrier]
        assert carrier.outcome == "ack" and batch[index] in request["records"]


def test_413_splits_the_batch_until_it_fits(tmp_path: Path) -> None:
    def small_only(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        if len(body["records"]) > 3:
            return httpx.Response(413, json={"statuscode": 413, "description": "Too many records"})
        return Api.ack(request, body)

    sender, _ = deliverer(tmp_path, Api(default=small_only))
    result = sender.deliver("1466", "1499", records(10))
    assert result.complete and sorted(result.acked) == list(range(10)) and not result.rejected


def test_a_retryable_failure_during_bisection_leaves_the_batch_pending(tmp_path: Path) -> None:
    api = Api(default=reject_missing_msisdn)
    api.answers = [reject_missing_msisdn] + [httpx.Response(500, json={"statuscode": 500})] * 10
    sender, _ = deliverer(tmp_path, api, max_attempts=2)
    result = sender.deliver("1466", "1499", records(4, {3}))
    assert not result.complete
    assert isinstance(result.failure, RetryableError)


def test_auth_failure_rereads_the_token_file_and_retries_with_the_new_key(tmp_path: Path) -> None:
    api = Api()
    config_dir = tmp_path
    sender, _ = deliverer(config_dir, api)

    def refuse_old_key(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        if request.headers["authorization"] != "Bearer key-2":
            return httpx.Response(401, json={"statuscode": 430, "description": "Authorization failed"})
        return Api.ack(request, body)

    api.default = refuse_old_key
    assert isinstance(sender.deliver("1466", "1499", records(1)).failure, AuthError)  # key-1 refused, file unchanged
    (config_dir / "api-token").write_text("key-2\n")  # the operator rotates to key 2
    result = sender.deliver("1466", "1499", records(1))
    assert result.complete
    assert [r["auth"] for r in api.requests] == ["Bearer key-1", "Bearer key-1", "Bearer key-2"]
    assert [p.outcome for p in result.pushes] == ["auth_error", "ack"]


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (httpx.Response(401, json={"statuscode": 430}), AuthError),
        (httpx.Response(498, json={"statuscode": 498}), AuthError),
        (httpx.Response(405, json={"statuscode": 405}), ConfigurationError),
    ],
)
def test_auth_and_configuration_errors_are_not_retried(tmp_path: Path, answer: httpx.Response, error: type) -> None:
    api = Api(default=answer)
    sender, slept = deliverer(tmp_path, api)
    result = sender.deliver("1466", "1499", records(5))
    assert isinstance(result.failure, error)
    assert len(api.requests) == 1 and slept == [] and result.acked == []


def test_unreadable_token_file_is_an_auth_error_naming_the_file(tmp_path: Path) -> None:
    config = api_config(tmp_path)
    (tmp_path / "api-token").unlink()
    with pytest.raises(AuthError) as caught:
        TokenSource(config).get()
    assert "api-token" in str(caught.value)
    (tmp_path / "api-token").write_text("\n")
    with pytest.raises(AuthError, match="empty"):
        TokenSource(config).get()


# ---------------------------------------------------------------------------- rate limiter


def test_rate_limiter_spaces_requests() -> None:
    limiter = RateLimiter(50)
    started = time.monotonic()
    for _ in range(11):
        limiter.acquire()
    elapsed = time.monotonic() - started
    assert 0.18 <= elapsed < 0.6  # 10 intervals of 20 ms


def test_rate_limiter_is_shared_across_threads() -> None:
    import threading

    limiter = RateLimiter(100)
    started = time.monotonic()
    threads = [threading.Thread(target=lambda: [limiter.acquire() for _ in range(5)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - started >= 0.18  # 20 acquisitions at 100/s


def test_rate_limiter_zero_means_no_ceiling() -> None:
    limiter = RateLimiter(0)
    started = time.monotonic()
    for _ in range(1000):
        limiter.acquire()
    assert time.monotonic() - started < 0.1


def test_client_uses_the_rate_limiter(tmp_path: Path) -> None:
    config = api_config(tmp_path, requests_per_second=40)
    client = ApiClient(config, TokenSource(config), RateLimiter(config.requests_per_second))
    client._http = httpx.Client(transport=httpx.MockTransport(Api()))
    started = time.monotonic()
    for _ in range(9):
        client.push("1466", "1499", records(1))
    assert time.monotonic() - started >= 0.18  # 8 intervals of 25 ms


# ---------------------------------------------------------------------------- on the wire


ACK_BODY = orjson.dumps({"statuscode": 0, "trans_id": "t", "result": {"correlation_id": "c", "status": 0}})
ACK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (len(ACK_BODY), ACK_BODY)


class WireServer:
    """A real HTTP/1.1 endpoint on 127.0.0.1: acks every request, keeps the bytes each connection received."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/v1/datastores/contacts"
        self.connections: list[bytearray] = []
        self.ended = threading.Semaphore(0)  # released as each connection ends
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def wait_ended(self, count: int) -> None:
        for _ in range(count):
            assert self.ended.acquire(timeout=10), "a connection the client should have closed stayed open"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        received = bytearray()
        self.connections.append(received)
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            with conn:
                pending = b""
                while True:
                    while b"\r\n\r\n" not in pending:
                        pending += self._recv(conn, received)
                    head, _, pending = pending.partition(b"\r\n\r\n")
                    length = int(re.search(rb"content-length: *(\d+)", head, re.IGNORECASE).group(1))
                    while len(pending) < length:
                        pending += self._recv(conn, received)
                    pending = pending[length:]
                    conn.sendall(ACK)
        except (EOFError, OSError):
            pass
        finally:
            self.ended.release()

    @staticmethod
    def _recv(conn: socket.socket, received: bytearray) -> bytes:
        chunk = conn.recv(65536)
        if not chunk:
            raise EOFError
        received += chunk
        return chunk


class Proof:
    """A lease as ApiClient sees it: proven held until `seconds` from each check."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def ensure(self, seconds: float) -> float:
        return time.monotonic() + self.seconds

    def check(self) -> None:
        pass


def wide_records(n: int) -> list[dict[str, Any]]:
    """A batch as large as real ones get: 500 records of about 200 bytes make 100 KB."""
    return [{"msisdn": f"+44207946{i:04d}", "firstname": f"F{i}", "notes": "x" * 160} for i in range(n)]


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[WireServer]:
    """A WireServer; `server.client_sends` is the size of each send/sendall of the client's sockets."""
    server = WireServer()
    server.client_sends = []
    for name in ("send", "sendall"):
        original = getattr(socket.socket, name)

        def spy(self: socket.socket, data: Any, *args: Any, _original: Any = original) -> Any:
            if self.getpeername()[1] == server.port:  # a client's socket, not the server's
                server.client_sends.append(len(data))
            return _original(self, data, *args)

        monkeypatch.setattr(socket.socket, name, spy)
    yield server
    server.close()


def wire_client(tmp_path: Path, url: str, **kwargs: Any) -> ApiClient:
    config = api_config(tmp_path, url=url)
    return ApiClient(config, TokenSource(config), RateLimiter(0), **kwargs)


def test_a_request_leaves_in_one_write_and_the_connection_is_kept(tmp_path: Path, server: WireServer) -> None:
    client = wire_client(tmp_path, server.url)
    try:
        for _ in range(2):
            assert client.push("1466", "1499", wide_records(500), fence=Proof(60)).trans_id == "t"
    finally:
        client.close()
    (received,) = server.connections  # one connection, kept alive for the second request
    assert len(received) > 2 * 100_000
    assert server.client_sends == [len(received) // 2] * 2  # headers and body: one write each time


def test_a_request_whose_lease_proof_ran_out_sends_no_byte(tmp_path: Path, server: WireServer) -> None:
    client = wire_client(tmp_path, server.url)
    try:
        # Proven until now: as if the daemon had been paused between the proof and the write.
        with pytest.raises(RetryableError, match="not sent"):
            client.push("1466", "1499", wide_records(5), fence=Proof(0))
        server.wait_ended(1)
        assert server.connections == [bytearray()] and server.client_sends == []  # the connection is closed unused
        assert client.push("1466", "1499", wide_records(5), fence=Proof(60)).trans_id == "t"  # the next attempt goes out
    finally:
        client.close()
    assert len(server.connections) == 2 and len(server.connections[1]) == server.client_sends[0]


def test_over_tls_a_request_whose_lease_proof_ran_out_sends_nothing(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate with")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    server = WireServer(tls=server_tls)
    client = wire_client(tmp_path, server.url)
    client._http = httpx.Client(
        transport=OneWriteTransport(limits=httpx.Limits(), verify=ssl.create_default_context(cafile=str(cert)))
    )
    try:
        with pytest.raises(RetryableError, match="not sent"):
            client.push("1466", "1499", wide_records(5), fence=Proof(0))
        server.wait_ended(1)
        assert server.connections == [bytearray()]  # what it received, decrypted: nothing
        for _ in range(2):
            assert client.push("1466", "1499", wide_records(500), fence=Proof(60)).trans_id == "t"
    finally:
        client.close()
        server.close()
    assert len(server.connections) == 2  # the second connection kept alive for both requests
