#!/usr/bin/env python3
"""llmhost: one OpenAI-compatible endpoint in front of the LLM servers you already run.

Register llama.cpp, vLLM, Ollama, LM Studio, TGI or any remote OpenAI-compatible API in a JSON
registry (``servers.json``) and serve them all behind one ``/v1`` API: chat completions (text and
images, streaming and not, tools), the Responses API (translated onto chat completions, stored
responses in ``servers.json.responses.sqlite``), Anthropic's Messages API (translated onto chat
completions; both relayed as they are to an entry opted in with "native"), legacy completions, embeddings and rerank. One file, standard library only; the
``mcp`` package is imported only when an MCP server is used.

Usage::

    python3 llmhost.py add local http://127.0.0.1:8080/v1        # probes GET /v1/models first
    python3 llmhost.py add openai https://api.openai.com/v1 --api-key-env OPENAI_API_KEY --model gpt-4o-mini
    python3 llmhost.py list [--json] | show NAME | remove NAME
    python3 llmhost.py serve [--host 127.0.0.1] [--port 4000] [--api-key KEY]...
    python3 llmhost.py serve            # an empty registry: serves what answers on local ports
    python3 llmhost.py status | ps      # reach the serve of this registry, on whatever port
    python3 llmhost.py chat [MODEL]     # talk to a model from the console (or a pipe)

Deliberately not supported: clustering (run several copies behind any load balancer), HTTP/2
toward clients or upstreams, request/response transformation beyond what a route needs (model
alias rewrite, base64 embeddings, rerank normalisation, the Responses API's translation),
storing prompts or keys in logs.

Sections, in dependency order (grep the banners):
    Limits · Errors · Wire format · SSE · Connections · HTTP server · Upstream client ·
    Registry · Router · Managed servers · Admission · Auth · MCP bridge · MCP server · Chat format ·
    Send path · Tool loop · Metrics · Messages API · Application · Responses API · Serve ·
    Bench · Chat console · CLI
"""

import json
import os
import re
import sys
import time
from bisect import bisect_left  # (per observation: an import in a function costs a request 1 us)

__version__ = "0.1.0"

# =============================================================================
# Limits
# =============================================================================
# Owns: every number that bounds memory, time or work, with its unit and precedent.
# Never: read at import from the environment (the CLI passes overrides down).

MAX_REQUEST_LINE = 8 * 1024  # bytes; aiohttp 8190 -> 414 past it
MAX_HEADER_BYTES = 64 * 1024  # bytes, all header lines; node 80 KiB -> 431
MAX_HEADER_COUNT = 100  # fields; http.client's _MAXHEADERS -> 431
MAX_BODY_BYTES = 32 * 1024 * 1024  # bytes; llama-swap 32 MiB, fits base64 images -> 413
MAX_UPSTREAM_BODY = 64 * 1024 * 1024  # bytes of a non-streamed upstream answer we buffer
HEADER_TIMEOUT = 10.0  # s to receive a whole request head; slowloris guard
BODY_TIMEOUT = 60.0  # s of silence while a body arrives; nginx client_body_timeout
BODY_MIN_RATE = 500  # bytes/s a body must average past BODY_TIMEOUT; Apache mod_reqtimeout
SEND_TIMEOUT = 60.0  # s a client may take none of our answer, then it is closed; nginx send_timeout
KEEPALIVE_IDLE = 5.0  # s an idle client connection is kept; uvicorn 5 s
MAX_CONNECTIONS = 1024  # open client connections per process; past it new ones are closed
CONNECT_TIMEOUT = 5.0  # s to open an upstream connection
UPSTREAM_TIMEOUT = 600.0  # s to the first byte and between bytes; model loading is slow
POOL_MAX_IDLE = 64  # idle keep-alive connections per upstream origin (> default concurrency)
POOL_IDLE_TIMEOUT = 30.0  # s an idle upstream connection is kept; httpcore
STALE_RETRY_WINDOW = 0.5  # s: a pooled connection failing later than this after the request
# went out was no stale one (the upstream took the request): a POST is not sent twice
DRAIN_TIMEOUT = 1.0  # s for an upstream's end after data: [DONE] before its connection is closed
MAX_ATTEMPTS = 3  # upstream servers tried for one request before giving up
FAILURES_BEFORE_COOLDOWN = 3  # consecutive failures; LiteLLM allowed_fails 3
COOLDOWN_BASE = 5.0  # s, doubled per further failure; LiteLLM cooldown_time 5 s
COOLDOWN_MAX = 300.0  # s, cap of the exponential cooldown
MAX_CONCURRENCY = 50  # requests proxied at once per process; the user's figure
QUEUE_SIZE = 100  # requests waiting for a slot before 429; Ollama queues, llama-swap 429s
QUEUE_TIMEOUT = 60.0  # s a request may wait in the queue before 429
PROBE_TIMEOUT = 5.0  # s for `add` (and health probes) to get GET {url}/models
PROBE_INTERVAL = 1.0  # s between health probes of a cooling server
WATCH_INTERVAL = 1.0  # s between registry file checks while serving
SHUTDOWN_TIMEOUT = 30.0  # s in-flight requests get to finish after SIGTERM
WORKER_MIN_UPTIME = 2.0  # s; a worker gone sooner failed to start: serve stops, not respawns
WORKER_SIGNAL_ECHO = 0.5  # s in which a worker's second stop signal is the first one again
WORKER_DEATHS = (5, 60.0)  # a worker slot dying this often in this many s stops serve too
MANAGED_TTL = 900.0  # s a managed server may idle before it is stopped; LM Studio's JIT TTL
MANAGED_START_TIMEOUT = 120.0  # s for a managed server to become ready (model loading)
MANAGED_STOP_GRACE = 5.0  # s between SIGTERM and SIGKILL of a managed server's process group
MANAGED_MODEL_GRACE = 5.0  # s a started server may list other models before its start fails
MANAGED_LOG_BYTES = 1024 * 1024  # bytes of output kept per managed server (halved when full)
MANAGED_BACKOFF_MAX = 60.0  # s between start attempts of a server that keeps failing
TICK = 0.25  # s between sweeps of deadlines (timeouts are enforced to this precision)
RELAY_CHUNK = 64 * 1024  # bytes read from an upstream at a time
LINGER_TIMEOUT = 2.0  # s we keep reading (and dropping) after an error answer; nginx lingering_close
LINGER_BYTES = 1024 * 1024  # bytes dropped at most before the socket is just closed
SHUTDOWN_UNWIND = 1.0  # s the requests a shutdown cut get to log themselves before the last flush
MAX_CHUNK_LINE = 4 * 1024  # bytes of a chunk-size line with its extensions; h11 reads 4 KiB too
WIRE_HIGH_WATER = 256 * 1024  # bytes buffered before a peer nobody reads is paused (asyncio's
# StreamReader pauses at twice its limit, 128 KiB by default)
LOG_MODEL_CHARS = 200  # a longer model name is cut in the access log
HOST_VERDICTS_MAX = 256  # Host fields whose check is remembered (a client can send any)
LOG_NAMES_MAX = 1024  # model names the access log keeps escaped forms of
METRICS_PATHS_MAX = 1024  # request paths whose route label /metrics remembers (a client can send any)
METRICS_PUBLISH_INTERVAL = 1.0  # s between a worker's writes of its figures (--workers): the
# staleness of the others' part of a scrape; Prometheus scrapes every 15 s by default
DISCOVER_TIMEOUT = 0.5  # s a local port gets to answer GET /v1/models (discover, zero-config)
ESTIMATE_CHARS_PER_TOKEN = 4  # token estimates (no upstream tokenizer): OpenAI's rule of thumb
ESTIMATE_TOKENS_PER_MESSAGE = 4  # a turn's role and separators, as chat templates add them
IMAGE_TOKENS_OPENAI = 765  # an image in a Responses token estimate; OpenAI's 512 px tile figure
# An image in a Messages token estimate: Anthropic's figure for the largest image it keeps
# (about 1.15 megapixels: width * height / 750).
IMAGE_TOKENS_ANTHROPIC = 1600
MCP_REQUEST_SERVERS = 16  # servers named by requests' server_url kept connected at once
MCP_MAX_ROUNDS = 8  # model -> tools -> model rounds per request before we stop calling tools
MCP_TOOLS_TTL_MIN = 1.0  # s a 2026 server's tool list is used at least, whatever its ttlMs
MCP_KEEPALIVE = 10.0  # s between SSE comments that keep a stream alive while tools run
MCP_CALL_TIMEOUT = 60.0  # s, one tool call incl. sampling rounds; Claude Desktop uses 60 s too
MCP_CONNECT_TIMEOUT = 30.0  # s, spawn + handshake; `npx -y pkg` may download on first start
MCP_ATTACHED_WAIT = 5.0  # s a request waits for an attached server still starting, then goes on
MCP_CLOSE_TIMEOUT = 10.0  # s per server at shutdown; the SDK's stdio exit is stdin-close, TERM, KILL (~2 s each)
MCP_BACKOFF_MAX = 30.0  # s between restarts of a server that keeps dying
MCP_LIST_PAGES_MAX = 100  # pages per list walk, so a paginator that never ends cannot hang us
MCP_RESULT_MAX = 100_000  # characters of one tool result's text given to a model (then cut, said so)
MCP_NAME_MAX = 64  # OpenAI function names: ^[a-zA-Z0-9_-]{1,64}$
RESPONSES_MAX_AGE = 30 * 86400.0  # s a stored response is kept; OpenAI keeps them 30 days
RESPONSES_MAX_COUNT = 10_000  # stored responses kept at most (the oldest go first)
RESPONSES_PRUNE_INTERVAL = 60.0  # s between a worker's prunes of the store (one walks the index)
RESPONSES_PRUNE_SAVES = 100  # saves between prunes however soon: a burst passes the count by little
RESPONSES_BUSY_TIMEOUT = 5.0  # s a store call waits for another worker's write; sqlite3's default
RESPONSES_LIST_MAX = 100  # input_items per page at most; OpenAI's limit
CHAT_RESULT_CHARS = 200  # characters of an MCP tool's result `chat` shows on its one line
CHAT_IMAGE_BYTES = 20 * 1024 * 1024  # bytes of a `chat` /image file; OpenAI's 20 MB per image
CHAT_HISTORY_LINES = 1000  # lines of `chat` input kept in ~/.llmhost_history; Python's REPL 1000
CHAT_STOP_TIMEOUT = 2.0  # s the in-process gateway of `chat` gets to close at its exit
MCP_LOGIN_TIMEOUT = 300.0  # s a person has to log in in the browser; the SDK's example OAuth
# client waits 300 s for its redirect too
MCP_TOKEN_EARLY = 60.0  # s before its expiry an access token is refreshed (at most half its
# life), so a call does not set out with a token that lapses on the way; MSAL refreshes 5 min early
MCP_CALLBACK_HEAD_LINES = MAX_HEADER_COUNT  # lines of a redirect's request head the loopback
# listener reads before it answers 431; it serves one browser on this machine

# =============================================================================
# Errors
# =============================================================================
# Owns: every failure that becomes an HTTP answer. Each class knows its status and its OpenAI
# error `type`/`code`; the Application renders them as {"error": {message, type, param, code}}.
# Never: does I/O.


class HTTPError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"
    close = False  # True: the connection cannot be trusted any more (framing error)

    def __init__(self, message, *, status=None, code=None, param=None, headers=()):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.param = param
        self.headers = list(headers)

    def envelope(self):
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


class BadRequest(HTTPError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class ProtocolError(BadRequest):
    """The request could not be framed; answered, then the connection is closed (RFC 9112 §2.2)."""
    code = "protocol_error"
    close = True


class Unauthorized(HTTPError):
    """RFC 9110 §11.6.1: a 401 names the scheme it takes."""
    status, type, code = 401, "invalid_request_error", "invalid_api_key"

    def __init__(self, message):
        super().__init__(message, headers=[("WWW-Authenticate", 'Bearer realm="llmhost"')])


class Forbidden(HTTPError):
    status, type, code = 403, "invalid_request_error", "forbidden"


class NotFound(HTTPError):
    status, type, code = 404, "invalid_request_error", "not_found"


class MethodNotAllowed(HTTPError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class RateLimited(HTTPError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class UpstreamError(HTTPError):
    """An upstream could not be used (refused, reset, broken answer); 502."""
    status, type, code = 502, "server_error", "upstream_error"


class UpstreamTimeout(UpstreamError):
    status, code = 504, "upstream_timeout"


class ServiceUnavailable(HTTPError):
    status, type, code = 503, "server_error", "service_unavailable"


class ClientGone(HTTPError):
    """The client left; nothing is written (499 in the access log, as nginx counts it)."""
    status, code = 499, "client_closed_request"


class RegistryError(Exception):
    """The registry file cannot be read or a change to it is invalid; the message names both."""


class CLIError(Exception):
    """What stops a command (or serve's start): one line on stderr, exit status 1."""


# =============================================================================
# Wire format
# =============================================================================
# Owns: HTTP/1.1 message heads and bodies as bytes (RFC 9110/9112): parsing requests, writing
# responses, chunked framing, decoding an upstream body's content coding. Pure: callers hand
# in lines and bytes.
# Raises: ProtocolError carrying the status the peer is owed (400, 413, 414, 431, 501, 505);
# UpstreamError for an upstream body that cannot be decoded.

REASONS = {
    100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    409: "Conflict", 413: "Content Too Large", 414: "URI Too Long", 422: "Unprocessable Content",
    429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # RFC 9110 §5.6.2
_REQUEST_LINE = re.compile(rb"(%s) ([^\x00-\x20\x7f]+) HTTP/(\d)\.(\d)\r\n" % _TOKEN)
# field-value: visible chars, SP/HTAB inside, obs-text allowed (RFC 9110 §5.5); no CR, LF, NUL.
_HEADER_LINE = re.compile(rb"(%s):[ \t]*((?:[\x21-\x7e\x80-\xff](?:[ \t]*[\x21-\x7e\x80-\xff])*)?)"
                          rb"[ \t]*" % _TOKEN)
_HEADER_LINE_CRLF = re.compile(_HEADER_LINE.pattern + rb"\r\n")
# The same grammar for a whole block at once, on its latin-1 text (OWS is stripped afterwards).
_HEADER_BLOCK = re.compile(r"(?:%s:[\t\x20-\x7e\x80-\xff]*\r\n)*" % _TOKEN.decode())
# Repeats of these are how requests get smuggled (RFC 9112 §6.3, §3.2).
_SINGLE_HEADERS = frozenset({"content-length", "host", "transfer-encoding", "authorization"})
_HEX_DIGITS = re.compile(rb"[0-9A-Fa-f]{1,16}")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*%s(?:=(?:%s|\"[^\"\r\n]*\"))?)*"
                         rb"[ \t]*\r\n" % (_TOKEN, _TOKEN))
KNOWN_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH",
                           b"CONNECT", b"TRACE"})
# No client header is forwarded upstream (heads are built from scratch), so hop-by-hop fields,
# the client's Authorization and anything named in Connection never reach an upstream.


class Request:
    """One parsed request. `headers` maps lower-cased names to values (repeats joined by ', ')."""
    __slots__ = ("method", "target", "path", "query", "version", "headers", "body", "keep_alive",
                 "conn", "started", "received", "request_id", "model", "server", "status",
                 "extra", "unread", "complete", "route", "has_body", "face", "tokens",
                 "key_label", "first_byte", "labels")

    def __init__(self, method, target, version, headers):
        self.method = method
        if target[:1] != "/" and target != "*":
            # absolute-form: its authority is the request's Host, whatever the Host field says
            # (RFC 9112 §3.2.2); the path and query are routed.
            headers["host"], target = absolute_form(target)
        self.target = target
        path, _, self.query = target.partition("?")
        self.path = path
        self.version = version
        self.headers = headers
        self.body = b""
        conn = headers.get("connection", "").lower()
        if version == "1.1":
            self.keep_alive = "close" not in conn
        else:
            self.keep_alive = "keep-alive" in conn
        self.conn = None
        self.started = 0.0  # when its head was read
        self.received = 0.0  # when its body was read (X-Llmhost-Overhead-Ms counts from here)
        self.request_id = ""
        self.extra = ()  # headers every response to this request carries (CORS)
        self.model = self.server = None  # for the access log
        self.status = 0
        self.unread = False  # a body left unread (the request is refused whatever it says)
        self.complete = False  # its whole answer went out: a client that leaves now is no 499
        self.route = None  # (handler, rest), when refuses_unread() has found it already
        self.has_body = False  # its head announces a body (read or not)
        self.face = None  # the API it speaks, for its errors' shape (None: OpenAI's)
        self.tokens = None  # {"prompt": n, "completion": n} of its answer's usage, when read
        self.key_label = None  # the label of the API key it came with (--api-keys-file)
        self.first_byte = None  # s from its head to its stream's first event going out
        self.labels = None  # its (route, model) labels in /metrics, once Metrics found them


_FAST_METHODS = {m: m.decode() for m in KNOWN_METHODS}
_FAST_VERSIONS = {b"HTTP/1.1\r\n": "1.1", b"HTTP/1.0\r\n": "1.0"}


def parse_request_line(line):
    """b"POST /v1/x HTTP/1.1\\r\\n" -> (method, target, version). RFC 9112 §3. The target is
    origin-form ("/v1/x?q"), "*", or absolute-form ("http://host:port/v1/x"), which Request
    splits."""
    if len(line) > MAX_REQUEST_LINE:
        raise ProtocolError("request line too long", status=414, code="uri_too_long")
    # The usual line (a known method, a path of visible ASCII, HTTP/1.x) without the regex;
    # anything else takes the full check below, which also says what is wrong.
    method, _, rest = line.partition(b" ")
    target, _, version = rest.partition(b" ")
    if method in _FAST_METHODS and version in _FAST_VERSIONS:
        text = target.decode("latin-1")
        if text[:1] == "/" and text.isascii() and text.isprintable():
            return _FAST_METHODS[method], text, _FAST_VERSIONS[version]
    if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
        raise ProtocolError("request line must end with CRLF (bare CR or LF)")
    m = _REQUEST_LINE.fullmatch(line)
    if m is None:
        raise ProtocolError("malformed request line")
    method, target, major, minor = m.groups()
    if major != b"1":
        raise ProtocolError("HTTP version not supported", status=505, code="http_version")
    if method not in KNOWN_METHODS:
        raise ProtocolError("method not implemented", status=501, code="not_implemented")
    if not (target.startswith(b"/") or target == b"*"):
        if not target[:8].lower().startswith((b"http://", b"https://")):
            raise ProtocolError("request target must be a path or an absolute URL")
        # absolute-form: servers MUST take it (RFC 9112 §3.2.2).
        # Its host must not be empty (RFC 9110 §4.2.1), and userinfo is an error (§4.2.4).
        authority = absolute_form(target.decode("latin-1"))[0]
        if not authority or "@" in authority:
            raise ProtocolError("the request target's authority must be host[:port]")
    return method.decode(), target.decode("latin-1"), "1." + minor.decode()


def absolute_form(target):
    """'http://h:4000/v1/x?q' -> ('h:4000', '/v1/x?q'): an absolute-form target's authority,
    and the origin-form target that is routed."""
    start = target.find("//") + 2
    ends = [i for i in (target.find("/", start), target.find("?", start)) if i >= 0]
    end = min(ends) if ends else len(target)
    rest = target[end:]
    return target[start:end], rest if rest.startswith("/") else "/" + rest


def parse_header_block(block):
    """All header lines (each ending CRLF) without the empty line -> {name: value}. RFC 9112 §5.

    One regex checks the whole block; splitting it is then plain string work (a third of the
    cost of matching line by line, which is done only to say what is wrong with a bad block)."""
    if len(block) > MAX_HEADER_BYTES:
        raise ProtocolError("request headers too large", status=431, code="headers_too_large")
    if block and not block.endswith(b"\r\n"):
        raise ProtocolError("header section must end with CRLF")
    if block.count(b"\r\n") > MAX_HEADER_COUNT:
        raise ProtocolError("too many header fields", status=431, code="headers_too_large")
    text = block.decode("latin-1")
    if _HEADER_BLOCK.fullmatch(text) is None:
        _header_block_fault(block)
    lines = text.split("\r\n")
    headers = {}
    for line in lines:  # (a loop: half the cost of a list and a dict comprehension)
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip(" \t")
    del headers[""]  # (what follows the last CRLF: no field, the regex saw to that)
    if len(headers) == len(lines) - 1:  # no name repeated (the usual case): done
        return headers
    headers = {}
    for name, _, value in [line.partition(":") for line in lines[:-1]]:
        name = name.lower()
        value = value.strip(" \t")
        old = headers.get(name)
        if old is None:
            headers[name] = value
        elif name in _SINGLE_HEADERS:
            raise ProtocolError(f"repeated {name} header")
        else:
            headers[name] = old + ", " + value
    return headers


def _header_block_fault(block):
    """Raise the ProtocolError that names the first bad line of a block that failed to match."""
    pos = 0
    while True:
        m = _HEADER_LINE_CRLF.match(block, pos)
        if m is None:
            if block[pos:pos + 1] in (b" ", b"\t"):
                raise ProtocolError("obsolete line folding is not accepted")
            raise ProtocolError("malformed header field")
        pos = m.end()


def body_framing(headers):
    """-> ('length', n) or ('chunked', None) for a request. RFC 9112 §6.3."""
    te = headers.get("transfer-encoding")
    cl = headers.get("content-length")
    if te is not None:
        if cl is not None:
            raise ProtocolError("both Content-Length and Transfer-Encoding")
        if te.strip().lower() != "chunked":
            raise ProtocolError("only Transfer-Encoding: chunked is supported", status=501,
                                code="not_implemented")
        return "chunked", None
    if cl is None:
        return "length", 0
    if not cl.isdigit() or not cl.isascii() or len(cl) > 18:
        raise ProtocolError("malformed Content-Length")
    n = int(cl)
    if n > MAX_BODY_BYTES:
        raise ProtocolError(f"request body over {MAX_BODY_BYTES} bytes", status=413,
                            code="body_too_large")
    return "length", n


def parse_chunk_size(line):
    """b"1a;ext=v\\r\\n" -> 26. Extensions are accepted and ignored (RFC 9112 §7.1.1)."""
    m = _CHUNK_SIZE.fullmatch(line)
    if m is None:
        raise ProtocolError("malformed chunk size line")
    return int(m.group(1), 16)


def check_header_value(value):
    """Refuse CR, LF and NUL in anything we write into a head (no response splitting)."""
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError("CR, LF or NUL in a header value")
    return value


def response_head(status, headers, version="1.1"):
    """Status line and header lines, ending with the empty line. `headers` is a list of pairs.
    A CR, LF or NUL inside any value is refused (no response splitting): counted once over the
    whole head rather than looked for in each value."""
    text = "HTTP/%s %d %s\r\n%s\r\n" % (version, status, REASONS.get(status, "Unknown"), "".join(
        [f"{name}: {value}\r\n" for name, value in headers]))  # (f-strings: 40% less than %)
    lines = len(headers) + 2
    if text.count("\n") != lines or text.count("\r") != lines or "\0" in text:
        raise ValueError("CR, LF or NUL in a header value")
    return text.encode("latin-1")


def encode_chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


# -- readers: bytes in, an event or "need more" (None) out ---------------------------------
# As h11's _readers.py: each takes the connection's buffer (a bytearray it consumes from the
# front) and never waits; the asyncio part (Wire, below) only feeds the buffer and waits when
# a reader says None. Seeing the buffer is what lets a connection notice bytes past an answer.

END = type("END", (), {"__repr__": lambda self: "END"})()  # a reader's "message ended"
_TOKEN_BYTES = frozenset(b"!#$%&'*+.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnop"
                         b"qrstuvwxyz-")


def take_request_head(buf):
    """A client's request head (through its empty line) taken from the front of `buf`, or
    None while it is incomplete. Bytes that can never become a request are refused at once
    rather than when the head timeout runs out: a bare LF line end (RFC 9112 §2.2 lets a
    server refuse it, and a proxy before us might end the line elsewhere), a first byte that
    starts no method (a TLS handshake sent to the plain-HTTP port), a head over the limits."""
    end = buf.find(b"\r\n\r\n")
    if end >= 0:
        head = bytes(buf[:end + 4])
        del buf[:end + 4]
        return head
    start = 0
    while buf[start:start + 2] == b"\r\n":  # empty lines before a request are ignored (§2.2)
        start += 2
    if len(buf) > start and buf[start] not in _TOKEN_BYTES and buf[start:] != b"\r":
        if buf[start] == 0x16:  # a TLS record's first byte: ContentType handshake
            raise ProtocolError("a TLS handshake was sent to a plain-HTTP port; use http://")
        raise ProtocolError("malformed request line")
    if buf.count(b"\n") != buf.count(b"\r\n"):
        raise ProtocolError("the request's lines must end with CRLF, not a bare LF")
    line_end = buf.find(b"\n", 0, MAX_REQUEST_LINE + 1)
    if line_end < 0 and len(buf) > MAX_REQUEST_LINE:
        raise ProtocolError("request line too long", status=414, code="uri_too_long")
    if len(buf) > MAX_REQUEST_LINE + MAX_HEADER_BYTES:
        raise ProtocolError("request headers too large", status=431, code="headers_too_large")
    return None


def take_response_head(buf):
    """An upstream's response head taken from the front of `buf`, its lines ending in CRLF,
    or None while it is incomplete. Lines ending in a bare LF are taken, as nginx takes them
    from upstreams (RFC 9112 §2.2 allows it): the head is rewritten with CRLF, so no field
    can hide behind one. A bare CR, or a head over MAX_HEADER_BYTES, is a ValueError."""
    end = buf.find(b"\r\n\r\n")
    if end >= 0:
        lines = buf.count(b"\r\n", 0, end)
        if buf.count(b"\n", 0, end) != lines or buf.count(b"\r", 0, end) != lines:
            end = -1  # (a bare LF or CR before it: the slow path below reads or refuses it)
    if end >= 0:
        head = bytes(buf[:end + 4])
        del buf[:end + 4]
        return head
    ends = [i for i in (buf.find(b"\n\n"), buf.find(b"\n\r\n")) if i >= 0]
    if not ends:
        if len(buf) > MAX_HEADER_BYTES:
            raise ValueError(f"a response head over {MAX_HEADER_BYTES} bytes")
        return None
    end = min(ends)
    size = end + (2 if buf[end + 1:end + 2] == b"\n" else 3)
    if size > MAX_HEADER_BYTES:
        raise ValueError(f"a response head over {MAX_HEADER_BYTES} bytes")
    head = bytes(buf[:size]).replace(b"\r\n", b"\n")
    del buf[:size]
    if b"\r" in head:
        raise ValueError("a bare CR in its head")
    return head.replace(b"\n", b"\r\n")


class ChunkedReader:
    """RFC 9112 §7.1 chunked framing: next(buf) -> body bytes (a chunk, or the part of one
    that has arrived), None when it needs more bytes, or END once the last chunk and the
    trailer fields (read and dropped, §7.1.2) are taken. `strict` (a client's request) refuses
    a bare LF at once; upstreams get nginx's leniency. Data not followed by CRLF is refused
    either way (h11 0.16's fix against smuggling)."""
    __slots__ = ("strict", "limit", "state", "left", "total", "trailer")

    def __init__(self, strict, limit=None):
        self.strict = strict
        self.limit = limit  # bytes the whole body may have (413 past it, at the size line)
        self.state = "size"
        self.left = 0  # bytes of the current chunk still to come
        self.total = 0  # bytes of all chunks so far, as their size lines say
        self.trailer = 0  # bytes of trailer fields so far

    def line(self, buf, what):
        """The next line of `buf` ending in CRLF, taken; None if it is not all here."""
        cut = buf.find(b"\n", 0, MAX_CHUNK_LINE)
        if cut < 0:
            if len(buf) >= MAX_CHUNK_LINE:
                raise ProtocolError(f"{what} line too long")
            return None
        line = bytes(buf[:cut + 1])
        del buf[:cut + 1]
        if line[-2:-1] != b"\r":
            if self.strict:
                raise ProtocolError(f"the {what} line must end with CRLF, not a bare LF")
            line = line[:-1] + b"\r\n"
        return line

    def next(self, buf):
        if self.state == "size":  # a whole chunk at hand, its size in bare hex (an SSE
            cut = buf.find(b"\r\n", 0, 18)  # event per chunk): taken in one step
            if 0 < cut and _HEX_DIGITS.fullmatch(buf, 0, cut) is not None:
                size = int(buf[:cut], 16)
                end = cut + 2 + size
                if 0 < size <= MAX_UPSTREAM_BODY and buf[end:end + 2] == b"\r\n" and (
                        self.limit is None or self.total + size <= self.limit):
                    self.total += size
                    data = bytes(buf[cut + 2:end])
                    del buf[:end + 2]
                    return data
        while True:
            state = self.state
            if state == "data":
                if not buf:
                    return None
                n = min(self.left, len(buf))
                data = bytes(buf[:n])
                del buf[:n]
                self.left -= n
                if not self.left:
                    self.state = "crlf"
                return data
            if state == "size":
                line = self.line(buf, "chunk size")
                if line is None:
                    return None
                self.left = size = parse_chunk_size(line)
                self.total += size
                if self.limit is not None and self.total > self.limit:
                    raise ProtocolError(f"request body over {self.limit} bytes", status=413,
                                        code="body_too_large")
                if size > MAX_UPSTREAM_BODY:  # (no sane sender declares one as big)
                    raise ProtocolError(f"a chunk of {size} bytes, over the "
                                        f"{MAX_UPSTREAM_BODY}-byte limit")
                self.state = "data" if size else "trailer"
            elif state == "crlf":
                if buf[:2] == b"\r\n" or not self.strict and buf[:1] == b"\n":
                    del buf[:2 if buf[:1] == b"\r" else 1]
                    self.state = "size"
                elif len(buf) < 2 and buf in (b"", b"\r"):
                    return None
                else:
                    raise ProtocolError("chunk data not followed by CRLF")
            elif state == "trailer":
                line = self.line(buf, "trailer")
                if line is None:
                    return None
                if line == b"\r\n":
                    self.state = "done"
                    return END
                self.trailer += len(line)
                if self.trailer > MAX_HEADER_BYTES or not _HEADER_LINE.fullmatch(line[:-2]):
                    raise ProtocolError("malformed chunked trailer")
            else:
                return END


def json_loads(data, decoder=None, **options):
    """json.loads (or `decoder`'s decode of a str), with a document nested too deeply to parse
    a ValueError like any other bad JSON (a RecursionError would make a client's request, or an
    upstream's answer, a 500)."""
    try:
        if decoder is None:
            return json.loads(data, **options)
        if data[:1] == "{" and data[-1:] == "}":  # (a request body, as clients send it: its
            try:  # scanner straight away, not decode()'s Python and two whitespace regexes)
                doc, end = decoder.scan_once(data, 0)
                if end == len(data):
                    return doc
            except StopIteration:
                pass  # (decode() says what is wrong)
        return decoder.decode(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")  # (Python's json module takes it; OpenAI does not)


def _finite(text):
    value = float(text)
    if abs(value) == float("inf"):  # 1e999: a body we re-encode would say Infinity: no JSON
        raise ValueError(f"the number {text[:30]} is out of range")
    return value


class DuplicateKeys(dict):
    """A JSON object of a request that has a key more than once (the last value kept, as
    json.loads does); `key` is the first repeated one. Marked, not refused, at every depth: a
    hook cannot tell the top level, and only there does a repeat change what is routed."""
    __slots__ = ("key",)


def _object_pairs(pairs):
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen = set()
    for key, _ in pairs:
        if key in seen:
            break
        seen.add(key)
    obj = DuplicateKeys(obj)
    obj.key = key
    return obj


# for clients' request bodies: what json.loads takes that is no JSON is refused, and objects
# with a key repeated are marked (parse_json_body). The hook costs about 0.5 us per object
# (3-6 us on a 2 KB chat body that parses in 7-10 us); counting each top-level key in the raw
# text cost more, and misses a key spelt with escapes ("mod\u0065l").
REQUEST_JSON = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite,
                                object_pairs_hook=_object_pairs)


# Built once: json.dumps with any option builds a JSONEncoder per call, which costs more than
# encoding a token's text (a translated stream encodes one per event).
def _compact_encoder(ascii):
    """obj -> str, as JSONEncoder(separators=(",", ":"), ensure_ascii=ascii).encode gives, with
    the C encoder that encode() builds anew on every call (with a closure and a dict for its
    circular check: about 10k instructions, a sixth of encoding a Response) built once. No
    circular check: what llmhost encodes is parsed JSON or its own trees (one nested too
    deeply still raises RecursionError)."""
    make = json.encoder.c_make_encoder
    if make is None:  # (a Python without _json)
        return json.JSONEncoder(separators=(",", ":"), ensure_ascii=ascii).encode
    string = json.encoder.encode_basestring_ascii if ascii else json.encoder.encode_basestring
    encode = make(None, json.JSONEncoder().default, string, None, ":", ",", False, False, True)
    join = "".join

    def encoded(obj):
        if obj.__class__ is str:
            return string(obj)
        if obj is None:  # (a Response's error, incomplete_details and usage, often)
            return "null"
        return join(encode(obj, 0))
    return encoded


_JSON_UTF8 = _compact_encoder(False)
_JSON_ASCII = _compact_encoder(True)


_JSON_STRING = json.encoder.encode_basestring


def json_bytes(obj):
    try:  # (a string, a token's text, without a second call)
        return (_JSON_STRING(obj) if obj.__class__ is str else _JSON_UTF8(obj)).encode()
    except UnicodeEncodeError:  # a lone surrogate (half an emoji) has no UTF-8: keep its escape
        return _JSON_ASCII(obj).encode()

def list_models(doc):
    """The model ids in an OpenAI `GET /models` answer, or None if it is not one."""
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        ids = [m.get("id") for m in doc["data"] if isinstance(m, dict)]
        if all(isinstance(i, str) for i in ids):
            return ids
    return None


# The content codings llmhost decodes where it must read an upstream's answer (RFC 9110 §8.4.1):
# those zlib reads; x-gzip is gzip (RFC 9110 §8.4.1.3). Upstreams are asked for identity.
# zlib's wbits: 31 is gzip; 15 is the zlib format HTTP's deflate names (-15: raw deflate, which
# some servers send instead, as urllib3 and browsers also accept).
_ZLIB_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}
_IDENTITY = ("", "identity")


class ContentDecoder:
    """Decodes an upstream body sent with Content-Encoding gzip or deflate, whole or piece by
    piece (a stream). Each feed() gives at most `limit` bytes, so a small body cannot fill
    memory (a decompression bomb). Raises UpstreamError (502) for a corrupt or cut body."""

    def __init__(self, encoding, limit=MAX_UPSTREAM_BODY):
        import zlib
        self.zlib = zlib
        self.encoding = encoding
        self.limit = limit
        self.wbits = _ZLIB_WBITS[encoding]
        self.decoder = zlib.decompressobj(self.wbits)
        self.fed = b"" if self.wbits == 15 else None  # deflate's bytes until one decodes

    def error(self, what):
        return UpstreamError(f"upstream answer's {self.encoding} encoding {what}",
                             code="upstream_content_encoding")

    def feed(self, data):
        out, size = [], 0
        while data:
            if self.decoder.eof:
                if self.wbits != 31:
                    raise self.error("has data after its end")
                # gzip members may follow one another (RFC 1952 §2.2), as gzip.decompress reads
                self.decoder = self.zlib.decompressobj(31)
            try:
                piece = self.decoder.decompress(data, self.limit + 1 - size)
            except self.zlib.error as exc:
                if self.fed is not None:
                    # no zlib header: raw deflate, read again from its first byte
                    self.wbits = -15
                    self.decoder = self.zlib.decompressobj(-15)
                    data, self.fed = self.fed + data, None
                    continue
                raise self.error(f"is corrupt ({exc})") from None
            if self.fed is not None:
                self.fed = None if piece or self.decoder.eof else self.fed + data
            size += len(piece)
            if size > self.limit:
                raise self.error(f"decodes to more than {self.limit} bytes")
            out.append(piece)
            data = self.decoder.unused_data if self.decoder.eof else b""
        return b"".join(out)

    def end(self):
        """Raise if the encoded body stopped before its end (a truncated answer)."""
        if not self.decoder.eof:
            raise self.error("is cut short")


def content_decoder(encoding, limit=MAX_UPSTREAM_BODY):
    """A ContentDecoder for a Content-Encoding value, None for identity; UpstreamError (502)
    for a coding llmhost cannot decode (br, zstd, several codings...), saying which."""
    if encoding in _IDENTITY:
        return None
    if encoding not in _ZLIB_WBITS:
        raise UpstreamError(f"upstream answer is encoded as {encoding[:60]!r} (Content-Encoding),"
                            " which llmhost cannot decode (only gzip and deflate); configure the "
                            "upstream to answer uncompressed", code="upstream_content_encoding")
    return ContentDecoder(encoding, limit)


def decode_content(body, encoding, limit=MAX_UPSTREAM_BODY):
    """A whole upstream body decoded from its Content-Encoding (`encoding`, lower-cased, ""
    for none); UpstreamError if it cannot be (see content_decoder)."""
    decoder = content_decoder(encoding, limit)
    if decoder is None:
        return body
    data = decoder.feed(body)
    decoder.end()
    return data


# =============================================================================
# SSE
# =============================================================================
# Owns: Server-Sent Events (WHATWG HTML §9.2): encoding one event, and an incremental decoder
# for the few places that must read a stream (bench, the MCP tool loop). Relaying never
# decodes: it passes bytes through.


def sse_event(data):
    """One `data:` event from bytes or a JSON-able object."""
    return b"data: " + (data if isinstance(data, bytes) else json_bytes(data)) + b"\n\n"


class SSEDecoder:
    """feed(bytes) -> the data of each event completed by those bytes (str, lines joined)."""

    def __init__(self):
        self.buffer = b""
        self.data = []

    def feed(self, chunk):
        if not self.buffer and not self.data and chunk.startswith(b"data: ") and \
                chunk.find(b"\n") == len(chunk) - 2 and chunk[-1] == 10 and chunk[-3] != 13:
            # One whole event, one data line, no CR (a read of a paced stream: a token's
            # chunk): its data, as the lines below give it, without splitting it into them
            return [chunk[6:-2].decode("utf-8", "replace")]
        data = self.buffer + chunk if self.buffer else chunk
        lines = data.split(b"\n")
        self.buffer = lines.pop()  # (the start of a line still to come)
        events = []
        for line in lines:
            if line[-1:] == b"\r":
                line = line[:-1]
            if not line:
                if self.data:
                    events.append("\n".join(self.data))
                    self.data = []
            elif line[:5] == b"data:":
                value = line[5:]
                self.data.append((value[1:] if value[:1] == b" " else value).decode("utf-8",
                                                                                    "replace"))
        return events

# =============================================================================
# Connections
# =============================================================================
# Owns: the asyncio side of a TCP connection, client's or upstream's: one buffer it fills
# (the Wire format readers take from it), waiting for bytes, pausing a peer that sends faster
# than we read, and write flow control.
# Raises: nothing; the end of the peer's bytes is `eof` (and `error`, for a reset).
# Never: parses a byte (the readers do) nor knows whose connection it is (`owner` does).



class _NoOwner:
    """A Wire's owner once its connection is lost (see Wire.connection_lost)."""
    def peer_gone(self):
        pass


_NO_OWNER = _NoOwner()


class _Ready:
    """An awaitable that is done at once (a wait that need not wait)."""
    def __await__(self):
        return iter(())


READY = _Ready()


class Wire:
    """An asyncio protocol (the loop calls its connection_made, data_received, eof_received,
    connection_lost, pause_writing and resume_writing) around a bytearray it owns.

    `owner` is told of the connection's events: `connected(wire)` once, and `peer_gone()` on
    EOF or a reset. `idle` (an upstream connection resting in the pool) turns any byte or EOF
    into a close: bytes no request asked for can only be a misframed answer."""
    __slots__ = ("owner", "transport", "loop", "buf", "eof", "lost", "error", "waiter", "want",
                 "paused", "write_waiter", "write_paused", "idle", "last_arrival", "received",
                 "poller")

    def __init__(self, owner):
        self.owner = owner
        self.transport = self.loop = None
        self.buf = bytearray()
        self.eof = False  # the peer sent its last byte (or the connection is lost)
        self.lost = False  # the connection is closed: nothing more can be written either
        self.error = None  # the OSError that ended the connection, if one did
        self.waiter = None  # future of a reader waiting for bytes
        self.want = 0  # ... for this many buffered bytes
        self.paused = False
        self.write_waiter = None
        self.write_paused = False
        self.idle = False
        self.last_arrival = 0.0  # monotonic s of the last bytes received (deadline renewal)
        self.received = 0  # bytes received in all
        self.poller = None  # select.poll of this socket, made on first use (readable_now)

    # -- called by the event loop ----------------------------------------------------------
    def connection_made(self, transport):
        import asyncio
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        connected = getattr(self.owner, "connected", None)
        if connected is not None:
            connected(self)

    def data_received(self, data):
        if self.idle:
            logger().debug("an idle upstream connection sent %d bytes no request asked for; "
                           "it is closed", len(data))
            self.transport.abort()
            return
        self.buf += data
        self.received += len(data)
        self.last_arrival = time.monotonic()
        waiter = self.waiter
        if waiter is not None and len(self.buf) >= self.want:
            self.waiter = None
            if not waiter.done():  # (cancelled: its reader was)
                waiter.set_result(None)
        elif waiter is None and len(self.buf) > WIRE_HIGH_WATER and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def eof_received(self):
        self.eof = True
        self.wake()
        if self.idle:
            self.transport.abort()
            return False
        self.owner.peer_gone()
        return True  # (half-closed: our answer can still be written)

    def connection_lost(self, exc):
        self.eof = self.lost = True
        self.error = exc
        self.wake()
        waiter = self.write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        owner, self.owner = self.owner, _NO_OWNER  # (the last call: the connection and its
        owner.peer_gone()  # wire refer to each other; freed at once, not by the next GC pass)

    def pause_writing(self):
        self.write_paused = True

    def resume_writing(self):
        self.write_paused = False
        waiter = self.write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- called by readers -----------------------------------------------------------------
    def wake(self):
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def wait(self, want=0):
        """An awaitable: until more bytes arrive (or `want` bytes in all are buffered), or the
        peer's end. The future itself, not a coroutine around it: a reader waits for every
        upstream and client read, and each level of coroutines is resumed on each wake-up."""
        if self.eof:
            return READY
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        self.want = want
        self.waiter = waiter = self.loop.create_future()
        return waiter

    async def drain(self):
        """Until the transport's write buffer is below its high-water mark again; raises
        ConnectionResetError if the connection is lost (as StreamWriter.drain does)."""
        while not self.lost:
            if not self.write_paused:
                return
            self.write_waiter = waiter = self.loop.create_future()
            try:
                await waiter
            finally:
                self.write_waiter = None
        raise ConnectionResetError("connection lost")

    def readable_now(self):
        """Whether the kernel holds bytes or an EOF for this socket that the loop has not
        delivered yet (the last look at a pooled connection before it is reused, as httpcore
        looks): poll(), which unlike select() takes any descriptor number."""
        poller = self.poller
        if poller is None:
            import select
            sock = self.transport.get_extra_info("socket")
            if sock is None:
                return False
            self.poller = poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))

# =============================================================================
# HTTP server
# =============================================================================
# Owns: client connections: reading requests (keep-alive, Content-Length and chunked bodies,
# Expect: 100-continue), writing responses (coalesced head and body, chunked streams), the
# deadlines that guard every read (slowloris, idle keep-alive), and noticing a client that left.
# Raises: nothing to its caller; a ProtocolError becomes a response plus Connection: close.
# Never: knows routes, models or upstreams (the Application's `handle(request)` does).

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("", "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(t):
    g = time.gmtime(t)  # RFC 9110 §5.6.7 IMF-fixdate, locale-independent
    return "%s, %02d %s %04d %02d:%02d:%02d GMT" % (
        _DAYS[g.tm_wday], g.tm_mday, _MONTHS[g.tm_mon], g.tm_year, g.tm_hour, g.tm_min, g.tm_sec)


class Sweeper:
    """One timer for every deadline: objects with `.deadline` (monotonic s or None) and `.expire()`.

    Per-read timers (`wait_for`) cost a task or a timer handle per read on the hot path; a sweep
    every TICK costs one pass over the tracked objects, and setting a deadline is one assignment.
    """

    def __init__(self, tick=TICK):
        self.tick = tick
        self.tracked = set()
        self.date = http_date(time.time())
        self.callbacks = []  # called each sweep: housekeeping (pool expiry, registry watch)

    async def run(self):
        import asyncio
        while True:
            await asyncio.sleep(self.tick)
            now = time.monotonic()
            self.date = http_date(time.time())
            for obj in tuple(self.tracked):
                deadline = obj.deadline
                if deadline is not None and now >= deadline:
                    obj.deadline = None
                    try:
                        obj.expire()
                    except Exception:  # one broken connection must not stop the sweeps
                        log_exception("expiring a deadline failed")
            for callback in self.callbacks:
                try:
                    callback(now)
                except Exception:  # housekeeping must never stop the sweeps
                    log_exception("housekeeping failed")


class ClientConnection:
    """One client socket. `phase` is what we wait for: idle, head, body, app, stream."""

    def __init__(self, server, wire):
        self.server = server
        self.wire = wire
        self.transport = wire.transport
        self.deadline = None
        self.phase = "head"
        self.gone = False  # the client closed or reset its side
        self.upstream = None  # upstream connection serving this client now (closed if we go)
        self.on_gone = None  # called when the client leaves mid-request (cancels MCP calls)
        self.task = None
        self.streaming = False  # response head sent as a chunked stream
        self.chunked = True
        self.send_mark = None  # our bytes the client had still to take when last looked at
        self.corked = None  # writes held while a batch of events is rendered (cork())
        self.opened = time.monotonic()
        self.body_started = 0.0  # when the current request's body began (its minimum rate)
        self.body_mark = 0  # wire.received then

    # -- deadlines -------------------------------------------------------------------------
    def expire(self):
        pending = self.transport.get_write_buffer_size()  # our answer still to go
        if self.phase == "body" and self.body_deadline() > time.monotonic():
            self.deadline = self.body_deadline()  # it is still sending, fast enough
            return
        if self.phase in ("head", "body"):
            # RFC 9110 §15.5.9: 408 for a request that did not arrive in time; then close.
            self.write_error(BadRequest("request not received in time", status=408,
                                        code="request_timeout"), close=True)
        elif pending and (self.send_mark is None or pending < self.send_mark):
            self.send_mark = pending  # it took some since (or this is the keep-alive
            self.deadline = time.monotonic() + SEND_TIMEOUT  # deadline): SEND_TIMEOUT more
            return
        elif pending:  # it took none for SEND_TIMEOUT (close() would wait for it to, for good)
            self.transport.abort()
            return
        self.transport.close()

    def body_deadline(self):
        """When the body being read is late: BODY_TIMEOUT after its last bytes, and never later
        than BODY_TIMEOUT plus a second per BODY_MIN_RATE bytes received since it began
        (Apache's mod_reqtimeout: body=20,MinRate=500), so a byte now and then, which renews
        an idle timeout for ever, cannot hold a connection."""
        wire = self.wire
        return min(wire.last_arrival + BODY_TIMEOUT, self.body_started + BODY_TIMEOUT +
                   (wire.received - self.body_mark) / BODY_MIN_RATE)

    def connected(self, wire):
        pass  # (HTTPServer made this connection for a wire that was already connected)

    def peer_gone(self):
        """Called by the Wire on EOF or reset from the client."""
        if self.phase in ("app", "stream"):
            self.gone = True
            upstream = self.upstream
            if upstream is not None:
                upstream.abort()  # the model stops generating: it sees its socket close
            if self.on_gone is not None:
                self.on_gone()

    # -- reading ---------------------------------------------------------------------------
    async def read_request(self, first):
        wire = self.wire
        self.phase = "head" if first else "idle"
        self.deadline = time.monotonic() + (HEADER_TIMEOUT if first else KEEPALIVE_IDLE)
        self.send_mark = None
        while True:
            head = take_request_head(wire.buf) if wire.buf else None
            if head is not None:
                break
            if wire.eof:
                if not wire.buf.strip():
                    return None  # clean close between requests
                head = bytes(wire.buf)  # the peer half-closed mid-head: say what was wrong
                self.parse_head(head + b"\r\n" if head.endswith(b"\r\n") else head)
                raise ProtocolError("incomplete request head")
            await wire.wait()
        started = time.monotonic()
        request = self.parse_head(head)
        request.started = request.received = started
        request.conn = self
        kind, length = body_framing(request.headers)
        if kind == "chunked" and request.version == "1.0":  # RFC 9112 §6.1: faulty framing
            request.keep_alive = False  # (a proxy before us may frame it otherwise): close
        request.has_body = kind == "chunked" or length != 0
        if not request.has_body or self.server.app.refuses_unread(request):
            if length != 0:  # refused whatever the body says (no API key): it is never read,
                request.unread = True  # so no client without a key makes us buffer 32 MiB
                request.keep_alive = False
            self.phase = "app"
            self.deadline = None
            return request
        buf = wire.buf
        if kind == "length" and len(buf) >= length:  # (the usual case: it came with the head)
            request.body = bytes(buf[:length])
            del buf[:length]
            self.phase = "app"
            self.deadline = None
            return request
        if request.headers.get("expect", "").lower() == "100-continue" and \
                request.version == "1.1":  # RFC 9110 §10.1.1: not for HTTP/1.0 clients
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.phase = "body"
        self.body_started = started
        self.body_mark = wire.received - len(wire.buf)
        self.deadline = self.body_deadline()
        if kind == "length":
            request.body = await self.read_length_body(length)
        else:
            request.body = await self.read_chunked_body()
        request.received = time.monotonic()
        self.phase = "app"
        self.deadline = None
        return request

    def parse_head(self, head):
        while head.startswith(b"\r\n"):  # RFC 9112 §2.2: ignore CRLF before a request line
            head = head[2:]
        end = head.find(b"\n") + 1
        if end == 0:
            raise ProtocolError("incomplete request head")
        method, target, version = parse_request_line(head[:end])
        headers = parse_header_block(head[end:-2])
        if version == "1.1" and "host" not in headers:
            raise ProtocolError("missing Host header")  # RFC 9112 §3.2
        return Request(method, target, version, headers)

    async def read_length_body(self, length):
        """`length` bytes, taken in one piece once they are all here."""
        wire = self.wire
        buf = wire.buf
        while len(buf) < length:
            if wire.eof:
                raise ProtocolError("incomplete request body")
            await wire.wait(length)
        body = bytes(buf[:length])
        del buf[:length]
        return body

    async def read_chunked_body(self):
        wire = self.wire
        reader = ChunkedReader(strict=True, limit=MAX_BODY_BYTES)
        parts = []
        while True:
            piece = reader.next(wire.buf)
            if piece is END:
                return b"".join(parts)
            if piece is None:
                if wire.eof:
                    raise ProtocolError("incomplete request body")
                await wire.wait()
                continue
            parts.append(piece)

    # -- writing ---------------------------------------------------------------------------
    async def drain(self, everything=False):
        """Wait while the client takes what we wrote (down to asyncio's low-water mark, or
        `everything`). One that takes none of it for SEND_TIMEOUT is closed (nginx's
        send_timeout: the time between two successful writes), so a client that stopped
        reading (or a host gone without a reset) does not hold its slot, and a model's, or
        our memory, for good; a slow one that keeps reading is served."""
        if everything:
            self.transport.set_write_buffer_limits(0)
        self.send_mark = self.transport.get_write_buffer_size()
        self.deadline = time.monotonic() + SEND_TIMEOUT
        try:
            await self.wire.drain()
        finally:
            self.deadline = self.send_mark = None

    def common_headers(self, request, keep_alive):
        headers = [("Date", self.server.sweeper.date)]
        if not keep_alive:
            headers.append(("Connection", "close"))
        elif request.version == "1.0":
            headers.append(("Connection", "keep-alive"))  # RFC 9112 §9.3: 1.0 must be told
        if request is not None:
            if request.request_id:
                headers.append(("X-Request-Id", request.request_id))
            headers.extend(request.extra)
        return headers

    def respond(self, request, status, headers, body=b""):
        """A whole response in one write (head and body coalesced)."""
        keep_alive = request is not None and request.keep_alive and not self.server.closing
        all_headers = self.common_headers(request, keep_alive)
        all_headers.extend(headers)
        if status >= 200 and status not in (204, 304):  # RFC 9110 §8.6: none for those
            all_headers.append(("Content-Length", len(body)))
        else:
            body = b""
        version = "1.0" if request is not None and request.version == "1.0" else "1.1"
        if request is not None and request.method == "HEAD":
            body = b""
        self.transport.write(response_head(status, all_headers, version) + body)
        return keep_alive

    def write_error(self, error, request=None, close=False):
        headers = [("Content-Type", "application/json")] + error.headers
        if (close or error.close) and request is not None:
            request.keep_alive = False  # common_headers then says Connection: close
        return self.respond(request, error.status, headers, json_bytes(error.envelope()))

    def start_stream(self, request, status, headers, first=b"", end=False):
        """Send the head of a streamed response (with the first piece of body, if it is at
        hand: one write instead of two); the rest goes through write_chunk/end_stream, or
        `end` says `first` is the whole body and the stream ends in this same write."""
        self.chunked = request.version != "1.0"
        if not self.chunked:
            request.keep_alive = False  # HTTP/1.0: the end of the body is the close
        keep_alive = request.keep_alive and not self.server.closing
        all_headers = self.common_headers(request, keep_alive)
        all_headers.extend(headers)
        if self.chunked:
            all_headers.append(("Transfer-Encoding", "chunked"))
        head = response_head(status, all_headers, request.version if request.version == "1.0"
                             else "1.1")  # (first: one that fails has sent nothing)
        self.phase = "stream"
        self.streaming = True
        if first and self.chunked:
            first = encode_chunk(first)
        if end:
            self.streaming = False
            if self.chunked:
                first += LAST_CHUNK
        self.send(head + first)
        return keep_alive

    def send(self, data):
        if self.corked is None:
            self.transport.write(data)
        else:
            self.corked.append(data)

    def cork(self):
        """Hold this connection's writes until uncork(), which makes them one: the events a
        renderer makes of one upstream read (a Responses stream's first text is three events)
        go out in one send, not one each."""
        if self.corked is None:
            self.corked = []

    def uncork(self):
        parts, self.corked = self.corked, None
        if parts and not self.transport.is_closing():  # (a client gone: nothing to send)
            self.transport.write(b"".join(parts))

    def write_chunk(self, data):
        if data:
            self.send(encode_chunk(data) if self.chunked else data)

    def end_stream(self, last=b""):
        """End the stream, with a last piece of body in the same write (and with whatever
        cork() held)."""
        if self.chunked:
            self.send(encode_chunk(last) + LAST_CHUNK if last else LAST_CHUNK)
        elif last:
            self.send(last)
        self.streaming = False
        if self.corked is not None:
            self.uncork()


class HTTPServer:
    """Accepts connections and runs the request loop; `app.handle(request)` answers each one,
    and `app.refuses_unread(request)` says when a body need not be read at all."""

    def __init__(self, app, sweeper, *, max_connections=MAX_CONNECTIONS):
        self.app = app
        self.sweeper = sweeper
        self.max_connections = max_connections
        self.connections = set()
        self.closing = False
        self.servers = []
        self.in_flight = 0
        self.idle = None  # asyncio.Event set when no request is in flight (for shutdown)
        self.evicted = 0  # connections closed to make room (see connected())

    async def listen(self, host, port, *, sock=None):
        import asyncio
        import socket
        loop = asyncio.get_running_loop()

        def factory():
            return Wire(self)  # (connected() gives the wire its ClientConnection)

        if sock is not None:
            server = await loop.create_server(factory, sock=sock, backlog=1024)
        else:
            server = await loop.create_server(factory, host, port, backlog=1024)
        for s in server.sockets:
            if s.family in (socket.AF_INET, socket.AF_INET6):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.servers.append(server)
        return [s.getsockname()[:2] for s in server.sockets]

    def peer_gone(self):
        pass  # (a wire refused in connected() loses its connection)

    def connected(self, wire):
        import socket
        transport = wire.transport
        if self.closing:
            transport.abort()
            return
        if len(self.connections) >= self.max_connections and not self.make_room():
            transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:  # asyncio skips this for sockets made with proto 0 (--workers makes those)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # the client is already gone; the read loop will see it
        conn = ClientConnection(self, wire)
        wire.owner = conn
        # The connection set keeps the task alive (the loop holds only weak references).
        conn.task = wire.loop.create_task(self._serve(conn))
        self.connections.add(conn)

    def make_room(self):
        """At MAX_CONNECTIONS, close the connection that has waited longest without a whole
        request (a head still trickling in, an idle keep-alive, a linger) so that a new client
        gets in: otherwise a flood of slow or idle connections, no key needed, keeps every
        client out. A connection whose request is being read or answered is never chosen."""
        waiting = [c for c in self.connections if c.phase in ("head", "idle", "linger")]
        if not waiting:
            return False
        victim = min(waiting, key=lambda c: c.opened)
        self.evicted += 1
        if self.evicted in (1, 10, 100) or not self.evicted % 1000:
            logger().warning("%d connections open (the limit): the oldest waiting ones are "
                             "closed to make room (%d so far)", self.max_connections,
                             self.evicted)
        self.connections.discard(victim)
        victim.transport.abort()
        return True

    async def _serve(self, conn):
        self.sweeper.tracked.add(conn)
        transport = conn.transport
        first = True
        try:
            while not self.closing:
                try:
                    request = await conn.read_request(first)
                except ProtocolError as exc:
                    conn.write_error(exc, close=True)
                    await self.linger(conn)
                    break
                if request is None:
                    break
                first = False
                self.in_flight += 1
                if self.in_flight == 1:  # (set again when the last one is done)
                    self.idle.clear()
                try:
                    keep_alive = await self.app.handle(request)
                finally:
                    if conn.corked is not None:  # (a stream's end uncorks; this is a net)
                        conn.uncork()
                    conn.phase = "idle"
                    conn.upstream = None
                    self.in_flight -= 1
                    if not self.in_flight:
                        self.idle.set()
                if not keep_alive or conn.gone:
                    if request.unread and not conn.gone:
                        await self.linger(conn)  # the answer first, then drop the body
                    elif not conn.gone and transport.get_write_buffer_size():
                        await conn.drain(everything=True)  # (the close would hold the rest
                    break  # for as long as the client pleases, the connection untracked)
                if transport.get_write_buffer_size() > RELAY_CHUNK:
                    await conn.drain()
        except (ConnectionError, OSError):
            pass  # the client went away; nothing is owed to it
        except Exception:
            log_exception("connection handler failed")
        finally:
            self.sweeper.tracked.discard(conn)
            self.connections.discard(conn)
            conn.deadline = None
            transport.close()

    async def linger(self, conn):
        """Half-close and drop what the client still sends, so our error answer is read before
        the close: closing with unread input sends a reset that can destroy the answer."""
        transport = conn.transport
        wire = conn.wire
        if transport.is_closing():
            return
        try:
            if transport.can_write_eof():
                transport.write_eof()
            conn.phase = "linger"
            conn.deadline = time.monotonic() + LINGER_TIMEOUT
            dropped = 0
            while dropped < LINGER_BYTES:
                dropped += len(wire.buf)
                wire.buf.clear()
                if wire.eof:
                    break
                await wire.wait()
        except (OSError, RuntimeError):
            pass

    async def shutdown(self, timeout):
        """Stop accepting, close idle connections, let in-flight requests finish up to `timeout`."""
        import asyncio
        self.closing = True
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            if conn.phase in ("idle", "head"):
                conn.transport.close()
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        tasks = [conn.task for conn in self.connections if conn.task is not None]
        self.abandon_in_flight()
        if tasks:  # their handlers log them as they unwind: before the access log's last flush
            await asyncio.wait(tasks, timeout=SHUTDOWN_UNWIND)

    def abandon_in_flight(self):
        """Close every connection now, requests under way or not (the end of a shutdown)."""
        self.idle.set()  # a shutdown still waiting for them stops waiting
        if self.in_flight:
            logger().warning("stopping now: %d request%s still in flight cut", self.in_flight,
                             "" if self.in_flight == 1 else "s")
        for conn in list(self.connections):
            conn.transport.abort()
        for conn in list(self.connections):
            if conn.task is not None:
                conn.task.cancel()


def logger():
    import logging
    return logging.getLogger("llmhost")


def log_exception(message):
    logger().exception(message)

# =============================================================================
# Upstream client
# =============================================================================
# Owns: HTTP/1.1 connections to upstream servers (http and https), one keep-alive pool per
# origin, response framing (Content-Length, chunked, close-delimited), connect/first-byte/idle
# timeouts through the Sweeper, and the one retry of a stale pooled connection.
# Raises: UpstreamError / UpstreamTimeout only; OSError never escapes this section.
# Never: knows model names or failover order (that is the Router's and the Application's).


class Origin:
    """Where an upstream lives: parsed once from its base URL."""

    def __init__(self, url):
        from urllib.parse import urlsplit
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL with a host: {url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        default_port = 443 if parts.scheme == "https" else 80
        self.port = parts.port or default_port
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if self.port == default_port else f"{host}:{self.port}"
        self.base_path = parts.path.rstrip("/")
        self.base_url = f"{self.scheme}://{self.host_header}{self.base_path}"
        self.key = (self.scheme, self.host, self.port)
        self.ssl = None
        if self.scheme == "https":
            import ssl
            self.ssl = ssl.create_default_context()


class UpstreamConnection:
    def __init__(self, origin, wire):
        self.origin = origin
        self.wire = wire
        self.transport = None if wire is None else wire.transport
        self.deadline = None
        self.timeout = None  # s between bytes once a request is out (the deadline's renewal)
        self.expired = False  # a deadline passed: errors that follow are timeouts
        self.aborted = False  # we closed it on purpose (the client left)
        self.reused = False
        self.idle_since = 0.0

    def connected(self, wire):
        pass

    def peer_gone(self):
        pass  # (a reader waiting on the wire sees its eof)

    def expire(self):
        wire = self.wire
        if self.timeout is not None and wire.last_arrival + self.timeout > time.monotonic():
            self.deadline = wire.last_arrival + self.timeout  # bytes came since: not idle
            return
        self.expired = True
        self.transport.abort()

    def abort(self):
        """Close it because the client left (a failure that follows is not retried)."""
        self.aborted = True
        self.transport.abort()

    def discard(self):
        """Close it because the pool will not keep it."""
        self.transport.abort()

    def usable(self):
        """Whether a pooled connection may carry another request: the server has not closed
        it, and no byte has come that no request asked for (a misframed answer's rest)."""
        wire = self.wire
        return not (wire.eof or wire.buf or self.transport.is_closing() or wire.readable_now())

    def closed_why(self):
        error = self.wire.error
        return getattr(error, "strerror", None) or (str(error) if error else "it closed early")

    async def read_head(self):
        """The next response head (CRLF lines). Raises ValueError for a malformed one, EOFError
        (with `partial`: whether some of it had come) if the connection ends first."""
        wire = self.wire
        while True:
            head = take_response_head(wire.buf) if wire.buf else None
            if head is not None:
                return head
            if wire.eof:
                exc = EOFError(self.closed_why())
                exc.partial = bool(wire.buf)
                raise exc
            await wire.wait()


class UpstreamResponse:
    """Status and headers of an upstream answer; the body is read with read_some()/read_all()."""

    passed = ()  # (name, value) of the fields passed on to the client (parse_response_head)

    def __init__(self, client, conn, status, headers, framing, length, timeout):
        self.client = client
        self.conn = conn
        self.status = status
        self.headers = headers
        self.framing = framing  # "length", "chunked" or "close"
        self.remaining = length
        self.chunks = ChunkedReader(strict=False) if framing == "chunked" else None
        self.timeout = timeout
        self.done = framing == "length" and length == 0
        self.reusable = framing != "close" and "close" not in headers.get("connection", "").lower()
        self.early = b""  # body bytes peek() read ahead; read_some() gives them first
        self.draining = False  # UpstreamClient.drain() reads its end: not ours to close
        if self.done:
            self.release()

    async def peek(self):
        """Wait for the first body bytes without taking them (read_some gives them next)."""
        if not self.done and not self.buffered():
            self.early = await self.read_some()

    def take(self):
        """The body bytes already at hand (b"" if none), without waiting; at the body's end,
        `done` is set and the connection released. Raises ProtocolError for bad framing."""
        buf = self.conn.wire.buf
        if self.framing == "length":
            n = min(self.remaining, len(buf))
            if not n:
                return b""
            data = bytes(buf[:n])
            del buf[:n]
            self.remaining -= n
            if not self.remaining:
                self.done = True
                self.release()
            return data
        if self.framing == "chunked":
            parts = []
            while True:
                piece = self.chunks.next(buf)
                if piece is None:
                    break
                if piece is END:  # (all chunks at hand are taken: the end is seen at once)
                    self.done = True
                    self.release()
                    break
                parts.append(piece)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        data = bytes(buf)
        buf.clear()
        return data

    async def read_some(self):
        """The next piece of the body as it arrives; b"" at its end."""
        if self.early:
            data, self.early = self.early, b""
            return data
        conn = self.conn
        wire = conn.wire
        while not self.done:
            try:
                data = self.take()
            except ProtocolError as exc:
                self.close()
                raise UpstreamError(f"upstream connection broke mid-answer ({exc.message})",
                                    code="upstream_protocol_error") from None
            if data or self.done:
                return data
            if wire.eof:
                if self.framing == "close" and wire.error is None:
                    self.done = True  # the close is the end
                    self.release()
                    return b""
                self.close()
                if conn.expired:
                    raise UpstreamTimeout("upstream stopped sending (idle timeout)")
                raise UpstreamError("upstream connection broke mid-answer "
                                    f"({conn.closed_why()})")
            await wire.wait()
        return b""

    def buffered(self):
        """Whether body bytes have already arrived (read_some would not wait)."""
        return bool(self.early or self.conn.wire.buf)

    async def read_all(self, limit=MAX_UPSTREAM_BODY):
        if self.framing == "length" and not self.done:
            if self.remaining > limit:
                self.close()
                raise UpstreamError(f"upstream answer larger than {limit} bytes")
            wire = self.conn.wire
            while len(wire.buf) < self.remaining and not wire.eof:
                await wire.wait(self.remaining)  # (one wake-up, one copy)
            if not self.early and len(wire.buf) >= self.remaining:
                return self.take()  # (all of it at hand, the usual case: no read_some loop)
        parts = []
        total = 0
        while True:
            data = await self.read_some()
            if not data:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            total += len(data)
            if total > limit:
                self.close()
                raise UpstreamError(f"upstream answer larger than {limit} bytes")
            parts.append(data)

    def release(self):
        self.client.release(self.conn, self.reusable and self.done)

    def close(self):
        self.done = True
        self.client.release(self.conn, False)


def whole_events(data):
    """SSE bytes -> (the whole events, the start of the next): cut after the last blank line
    (an event's end, LF or CRLF style). An "event" too big to hold is passed on whole."""
    lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\n\r\n")
    cut = max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)
    if cut < len(data) and len(data) - cut < MAX_UPSTREAM_BODY:
        return data[:cut], data[cut:]
    return data, b""


def cut_short(resp, done_seen):
    """The UpstreamError of a stream that ended without data: [DONE] when its end is the close
    (no length, not chunked): then a death looks like an end, and only [DONE] tells them
    apart. None when the stream ended well, or its framing showed its end."""
    if resp.framing == "close" and not done_seen:
        return UpstreamError("upstream closed the stream before data: [DONE]")
    return None


def stream_delivered(request, resp):
    """The client has its whole answer (a stream ended at data: [DONE]): what is left of the
    upstream's, its end, is read in the background (UpstreamClient.drain), so the client's next
    request on this connection does not wait for it. The client may leave now: that is no 499."""
    request.complete = True
    request.conn.upstream = None  # (its leaving must not abort the upstream connection)
    if not resp.done:
        resp.client.drain(resp)


def content_encoding(resp):
    """The Content-Encoding of an upstream answer, lower-cased, repeats joined as one list
    (RFC 9110 §8.4, §5.3); "" for none. It is one of the fields passed on to the client."""
    if not resp.passed:
        return ""
    return ", ".join([v for k, v in resp.passed if k == "content-encoding"]).lower()


async def read_decoded(resp, decoder):
    """resp.read_some() for a body llmhost reads as it comes (a stream) that an upstream
    encoded: the next decoded piece, b"" at its end; a cut or corrupt body is UpstreamError."""
    while True:
        data = await resp.read_some()
        text = decoder.feed(data) if data else b""
        if not data or resp.done:
            decoder.end()
        if text or not data:
            return text


async def fetch_json(client, up, path, timeout=PROBE_TIMEOUT):
    """GET `path` from the Upstream `up` (health checks, model lists) -> (status, parsed JSON
    or None). Raises UpstreamError."""
    resp = await client.request(up.origin, up.head("GET", path), b"", timeout=timeout,
                                connect_timeout=min(CONNECT_TIMEOUT, timeout))
    body = decode_content(await resp.read_all(), content_encoding(resp))
    try:
        return resp.status, json_loads(body)
    except ValueError:
        return resp.status, None


def fetch_models(client, up, timeout=PROBE_TIMEOUT):
    """GET the upstream's model list -> (status, parsed JSON or None)."""
    return fetch_json(client, up, up.origin.base_path + "/models", timeout)


# The fields of an upstream's head that llmhost reads, found in one pass: lower-cased name ->
# its key in UpstreamResponse.headers; and those it passes on to the client as they came, as a
# remote API's clients read them (x-ratelimit-*; the openai client waits retry-after-ms and
# obeys x-should-retry), and Content-Encoding, without which a relayed body that an upstream
# compressed anyway (llmhost asks for identity) could not be read (content_encoding() finds it
# there for the routes that decode). No other field is forwarded.
_RESPONSE_FIELD = re.compile(
    rb"\r\n(content-type|content-length|transfer-encoding|connection|retry-after|location|"
    rb"x-ratelimit-[a-z0-9-]+|retry-after-ms|x-should-retry|openai-processing-ms|"
    rb"content-encoding):"
    rb"([^\r\n]*)", re.IGNORECASE)
_RESPONSE_NAMES = {name.encode(): name for name in (
    "content-type", "content-length", "transfer-encoding", "connection", "retry-after",
    "location")}
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # in a field value: no valid HTTP
# The control bytes that may be nowhere in a head (all but HTAB, CR and LF) each turned into
# another by bytes.translate: a head without any comes out equal. (A table and no deletions:
# a tight loop. 167 ns for a 155-byte head, against 284 for translate's deleting form, which
# builds its table on every call, and 1,100 for a regex search.)
_HEAD_CONTROLS = bytes(b ^ 0x40 if b < 0x20 and b not in b"\t\r\n" or b == 0x7f else b
                       for b in range(256))


class UpstreamClient:
    def __init__(self, sweeper):
        self.sweeper = sweeper
        self.idle = {}  # origin key -> list of idle UpstreamConnection (last in, first out)
        self.draining = {}  # task of drain() -> the UpstreamResponse it reads
        sweeper.callbacks.append(self.expire_idle)

    async def connect(self, origin, timeout):
        import asyncio
        conn = UpstreamConnection(origin, None)
        wire = Wire(conn)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().create_connection(
                lambda: wire, origin.host, origin.port, ssl=origin.ssl,
                server_hostname=origin.host if origin.ssl else None), timeout)
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"connect to {origin.host_header} timed out after {timeout:g}s",
                                  code="upstream_connect_timeout") from None
        except (OSError, ValueError) as exc:
            raise UpstreamError(f"cannot connect to {origin.host_header}: "
                                f"{exc.strerror or exc}" if isinstance(exc, OSError) else str(exc),
                                code="upstream_unreachable") from None
        # (asyncio sets TCP_NODELAY itself on the TCP sockets it connects)
        conn.wire = wire
        conn.transport = wire.transport
        return conn

    async def request(self, origin, head, body, *, timeout=UPSTREAM_TIMEOUT,
                      connect_timeout=CONNECT_TIMEOUT, on_connection=None):
        """Send one request; return its UpstreamResponse once the head has arrived.

        A pooled connection that fails at once, before any response byte, is retried once on a
        fresh one: the server closed it while it idled (RFC 9112 §9.3.1). One that fails later
        had taken the request, which is not sent twice (RFC 9110 §9.2.2; nginx neither).
        """
        import asyncio
        idle = self.idle.get(origin.key)
        while True:
            if idle:
                conn = idle.pop()
                if not conn.usable():
                    conn.discard()
                    continue
                conn.wire.idle = False
                conn.reused = True
            else:
                conn = await self.connect(origin, connect_timeout)
            if on_connection is not None:
                on_connection(conn)
            self.sweeper.tracked.add(conn)
            sent = time.monotonic()
            conn.deadline = sent + timeout
            conn.timeout = None  # (no renewal until the head is here: the first-byte limit)
            interim = False  # (an upstream that sent a 1xx answer has taken the request)
            try:
                conn.transport.write(head + body if len(body) < RELAY_CHUNK else head)
                if len(body) >= RELAY_CHUNK:
                    conn.transport.write(body)
                raw = await conn.read_head()
                while raw[9:10] == b"1" and raw[:5] == b"HTTP/" and raw[12:13] in (b" ", b"\r"):
                    interim = True
                    raw = await conn.read_head()  # skip 1xx interim answers
            except (OSError, EOFError) as exc:
                self.release(conn, False)
                if conn.expired:
                    raise UpstreamTimeout(f"{origin.host_header} sent no answer within "
                                          f"{timeout:g}s") from None
                if conn.reused and not conn.aborted and not interim and not getattr(
                        exc, "partial", False) and time.monotonic() - sent < STALE_RETRY_WINDOW:
                    idle = None  # stale pooled connection: once more, on a fresh one
                    continue
                raise UpstreamError(f"{origin.host_header} closed the connection without an "
                                    "answer", code="upstream_closed") from None
            except ValueError as exc:
                self.release(conn, False)
                raise UpstreamError(f"{origin.host_header} sent a malformed answer: {exc}",
                                    code="upstream_protocol_error") from None
            except asyncio.CancelledError:  # (bench's deadline, a shutdown): the upstream
                self.release(conn, False)  # sees its socket close and stops generating
                raise
            conn.timeout = timeout  # from here, the limit is between bytes
            try:
                resp = self.parse_response_head(conn, raw, timeout)
            except ValueError as exc:
                self.release(conn, False)
                raise UpstreamError(f"{origin.host_header} sent a malformed answer: {exc}",
                                    code="upstream_protocol_error") from None
            if 200 <= resp.status < 300 or resp.status >= 400:
                return resp
            if not resp.done:  # (its fields are not passed on: a 3xx without Location is
                resp.close()  # no use)
            location = resp.headers.get("location")
            raise UpstreamError(f"{origin.host_header} answered HTTP {resp.status}" + (
                f", a redirect to {location[:200]}; llmhost does not follow redirects: "
                "register the URL it points to" if location else ""),
                code="upstream_protocol_error")

    def parse_response_head(self, conn, raw, timeout):
        """Status, the few fields we use and those we pass on (see _RESPONSE_FIELD). An
        upstream's other fields are never forwarded, so they are not parsed."""
        if raw[:7].lower() != b"http/1." or raw[8:9] != b" " or not raw[9:12].isdigit() or \
                raw[9:10] == b"0" or raw[12:13] not in (b" ", b"\r"):
            line = raw[:raw.find(b"\r")]  # (not the fields after it)
            raise ValueError(f"status line {line[:60]!r}")
        status = int(raw[9:12])
        headers, passed = {}, []
        controls = raw.translate(_HEAD_CONTROLS) != raw  # (then each field is looked at)
        for name, value in _RESPONSE_FIELD.findall(raw):
            key = name.lower()
            if controls and _CONTROL.search(value):  # (a NUL in Content-Type, passed on)
                raise ValueError(f"a control character in its {key.decode()}")
            name = _RESPONSE_NAMES.get(key)
            if name is None:  # one to pass on
                passed.append((key.decode(), value.strip().decode("latin-1")))
            elif name not in headers:  # the first of a repeated field counts
                headers[name] = value.strip().decode("latin-1")
            elif name == "content-length":
                raise ValueError("repeated Content-Length")
        if raw[7:8] == b"0" and "keep-alive" not in headers.get("connection", "").lower():
            headers["connection"] = "close"
        length = headers.get("content-length")
        if status in (204, 304):
            framing, length = "length", 0
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            framing, length = "chunked", None
        elif length is not None:
            if not length.isdigit():
                raise ValueError(f"Content-Length {length[:30]!r}")
            framing, length = "length", int(length)
        else:
            framing = "close"
        resp = UpstreamResponse(self, conn, status, headers, framing, length, timeout)
        resp.passed = passed
        return resp

    def release(self, conn, reusable):
        self.sweeper.tracked.discard(conn)
        conn.deadline = None
        if reusable and conn.wire.buf:  # bytes past the answer's end: the two sides no longer
            logger().debug("upstream %s sent %d bytes past its answer; its connection is "
                           "closed", conn.origin.host_header, len(conn.wire.buf))
            reusable = False  # agree where answers end, so no later answer can be trusted
        if reusable and not conn.expired:
            idle = self.idle.setdefault(conn.origin.key, [])
            if len(idle) < POOL_MAX_IDLE:
                conn.idle_since = time.monotonic()
                conn.wire.idle = True
                idle.append(conn)
                return
        conn.discard()

    def expire_idle(self, now):
        for idle in self.idle.values():
            while idle and now - idle[0].idle_since > POOL_IDLE_TIMEOUT:
                idle.pop(0).discard()

    def drain(self, resp, timeout=DRAIN_TIMEOUT):
        """Read the rest of `resp`, its end, in a task of its own, so its connection goes back
        to the pool; one that sends more (bytes after data: [DONE]) or takes longer is closed."""
        import asyncio

        async def read_end():
            try:
                await asyncio.wait_for(resp.read_all(limit=0), timeout)  # b"" at its end
                return
            except asyncio.TimeoutError:
                why = f"no end within {timeout:g}s"
            except UpstreamError as exc:  # (bytes after [DONE] are over the limit of 0)
                why = exc.message
            logger().debug("after data: [DONE]: %s; the upstream connection is closed", why)
            resp.close()

        resp.draining = True
        task = asyncio.get_running_loop().create_task(read_end())
        self.draining[task] = resp
        task.add_done_callback(self.draining.pop)

    def close_all(self):
        for task, resp in list(self.draining.items()):
            task.cancel()
            resp.close()
        for idle in self.idle.values():
            for conn in idle:
                conn.discard()
        self.idle.clear()

# =============================================================================
# Registry
# =============================================================================
# Owns: servers.json — parsing with errors that name the file, line and field; validation;
# atomic saves (temp file in the same folder, fsync, os.replace) under an exclusive lock.
# Raises: RegistryError only.
# Never: touches the network (the CLI probes before it calls update_registry).

REGISTRY_VERSION = 1
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _is_str_list(value):
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def _is_number(value):
    """A positive, finite number (inf would be written as Infinity: no JSON)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        0 < value < float("inf")


def valid_url(url, credentials=False):
    """None if `url` is a usable upstream base URL, else the reason it is not. `user:pw@` is
    refused unless `credentials` (MCP's HTTP client sends them; ours would only show them)."""
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https"):
        return "the scheme must be http or https"
    if not parts.hostname:
        return "there is no host"
    if parts.query or parts.fragment:
        return "a base URL has no query or fragment"
    if not credentials and (parts.username is not None or parts.password is not None):
        return "credentials in a URL are not used (they would be shown by list); give the key " \
            "with --api-key-env or --api-key"
    if any(c.isspace() for c in url):
        return "it contains whitespace"
    if not url.isascii():
        return "it has non-ASCII characters (percent-encode them)"
    return None


# The password of a user:password@ in a URL, up to the authority's last '@' (as urlsplit
# reads 'http://u:p@ss@host/'), in a URL alone or in a message that names one.
_URL_PASSWORD = re.compile(r"(://[^/?#\s:@]*:)[^/?#\s]*@")


def hide_password(text):
    """`text` (a URL, or a message naming URLs) with the password of each user:password@
    replaced by ***, for printing: what is shown of a URL anywhere (list, status, errors,
    logs), as keys are never shown."""
    return _URL_PASSWORD.sub(r"\1***@", text) if "@" in text else text


def url_under(url, prefix):
    """Whether `url` is `prefix` or below it: the same scheme, host and port (any port for a
    prefix such as http://host:), and its path the prefix's or under it. Compared parsed, not
    as text, so neither 'http://a:1@b/' nor 'http://a:1\\@b/' passes for http://a:1; a URL
    with an '@' anywhere never passes, nor one with a '.' or '..' path segment: the path sent
    is the resolved one (RFC 3986 §5.2.4), so /allowed/../x would reach /x."""
    from urllib.parse import unquote, urlsplit
    if valid_url(url) or "\\" in url or "@" in url:
        return False
    u, p = urlsplit(url), urlsplit(prefix)
    default = {"http": 80, "https": 443}
    port = u.port or default[u.scheme]
    if (u.scheme, u.hostname) != (p.scheme, p.hostname) or port != (
            port if p.netloc.endswith(":") else p.port or default.get(p.scheme)):
        return False  # ("http://host:" allows every port of host)
    path, base = u.path or "/", p.path or "/"
    if any(segment in (".", "..") for segment in unquote(path).split("/")):
        return False  # (also %2e%2e, which some servers decode before they route)
    return path == base or path.startswith(base if base.endswith("/") else base + "/")


# mcpServers entries: the shape Claude Desktop, Cursor, LM Studio and VS Code use.
MCP_HTTP_TYPES = {"http": "http", "streamable-http": "http", "streamableHttp": "http", "sse": "sse"}
MCP_ENTRY_KEYS = {"command", "args", "env", "cwd", "url", "headers", "type", "timeout",
                  "sampling_model", "oauth", "private"}
# An HTTP server's OAuth settings (the `oauth` object); none is a secret: a client secret comes
# from the environment variable client_secret_env names, a private key from the file client_key.
MCP_OAUTH_KEYS = {
    "client_id": (lambda v: isinstance(v, str) and v.strip(), "a client id"),
    "client_secret_env": (lambda v: isinstance(v, str) and ENV_NAME_RE.fullmatch(v),
                          "an environment variable name"),
    "client_metadata_url": (lambda v: _is_document_url(v),
                            "an https:// URL with a path (a Client ID Metadata Document)"),
    "scope": (lambda v: isinstance(v, str) and v.strip(), "space-separated scopes"),
    "client_credentials": (lambda v: isinstance(v, bool), "true or false"),
    "client_key": (lambda v: isinstance(v, str) and v.strip(), "the path of a PEM private key"),
    "callback_port": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536,
                      "a port number"),
}


def _is_document_url(url):
    """Whether `url` can be a client id (draft-ietf-oauth-client-id-metadata-document §3: https,
    with a path)."""
    from urllib.parse import urlsplit
    return isinstance(url, str) and url.startswith("https://") and valid_url(url) is None and \
        urlsplit(url).path not in ("", "/")


def validate_mcp_oauth(name, oauth):
    """Errors (strings) for an entry's `oauth` object."""
    if not isinstance(oauth, dict):
        return [f"{name}: 'oauth' must be an object"]
    if "client_secret" in oauth:
        return [f"{name}: oauth.client_secret: a secret is not kept in the registry; name the "
                "environment variable that holds it with client_secret_env"]
    errors = [f"{name}: oauth: unknown key {k!r}" for k in sorted(set(oauth) - set(MCP_OAUTH_KEYS))]
    errors += [f"{name}: oauth.{k} must be {rule[1]}" for k, rule in MCP_OAUTH_KEYS.items()
               if k in oauth and not rule[0](oauth[k])]
    if oauth.get("client_credentials"):
        if "client_id" not in oauth or ("client_secret_env" in oauth) == ("client_key" in oauth):
            errors.append(f"{name}: oauth.client_credentials needs client_id and one of "
                          "client_secret_env or client_key")
    elif "client_key" in oauth:
        errors.append(f"{name}: oauth.client_key is for client_credentials (private_key_jwt)")
    if "client_secret_env" in oauth and "client_id" not in oauth:
        errors.append(f"{name}: oauth.client_secret_env needs client_id")
    return errors

def mcp_transport(entry):
    """'stdio', 'http' or 'sse' for a valid entry."""
    return "stdio" if "command" in entry else MCP_HTTP_TYPES.get(entry.get("type", "http"), "http")
def _is_str_map(v):
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())
def validate_mcp_entry(name, entry):
    """Errors (strings) for one `mcpServers` entry; [] when it is usable."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        return [f"name {name!r}: use 1-64 letters, digits, '_', '-', '.', starting with a "
                "letter or digit"]
    if name in ("servers", "tools"):  # (/mcp/NAME serves it; these were /v1/mcp/'s aliases)
        return [f"name {name!r} is reserved: /mcp/{name} is not an MCP server's; choose another"]
    if not isinstance(entry, dict):
        return [f"{name}: entry must be an object"]
    errors = [f"{name}: unknown key {k!r}" for k in sorted(set(entry) - MCP_ENTRY_KEYS)]
    if ("command" in entry) == ("url" in entry):
        return errors + [f"{name}: needs exactly one of 'command' (stdio) or 'url' (HTTP)"]
    if "command" in entry:
        if not isinstance(entry["command"], str) or not entry["command"].strip():
            errors.append(f"{name}: 'command' must be a non-empty string")
        if not isinstance(entry.get("args", []), list) or not all(isinstance(a, str) for a in entry.get("args", [])):
            errors.append(f"{name}: 'args' must be a list of strings")
        if not _is_str_map(entry.get("env", {})):
            errors.append(f"{name}: 'env' must map names to strings")
        if not isinstance(entry.get("cwd", ""), str):
            errors.append(f"{name}: 'cwd' must be a string")
        if entry.get("type", "stdio") != "stdio":
            errors.append(f"{name}: 'type' must be 'stdio' for a command")
        errors += [f"{name}: {k!r} is for URL servers" for k in ("headers", "oauth") if k in entry]
    else:
        url = entry["url"]
        if not isinstance(url, str) or valid_url(url, credentials=True) is not None:
            errors.append(f"{name}: 'url' must be an http:// or https:// URL")
        if not _is_str_map(entry.get("headers", {})):
            errors.append(f"{name}: 'headers' must map names to strings")
        if entry.get("type", "http") not in MCP_HTTP_TYPES:
            errors.append(f"{name}: 'type' must be one of http, streamable-http, sse")
        errors += [f"{name}: {k!r} is for command servers" for k in ("args", "env", "cwd") if k in entry]
        if "oauth" in entry:
            errors += validate_mcp_oauth(name, entry["oauth"])
    if not isinstance(entry.get("private", False), bool):
        errors.append(f"{name}: 'private' must be true or false")
    t = entry.get("timeout")
    if t is not None and not _is_number(t):
        errors.append(f"{name}: 'timeout' must be a positive number of seconds")
    return errors
def import_mcp_json(doc):
    """Entries from a Claude Desktop / Cursor / LM Studio `mcp.json` (`mcpServers`) or VS Code
    (`servers`, also nested under `mcp` in settings.json). Returns (imported, skipped, renamed)
    with skipped = [(name, reason)] and renamed = {name: name in the file} for names it had to
    change; raises ValueError for a document that is not such a file.
    Client-specific keys (autoApprove, disabled...) are dropped."""
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    servers = doc.get("mcpServers", doc.get("servers", (doc.get("mcp") or {}).get("servers")))
    if not isinstance(servers, dict):
        raise ValueError("no 'mcpServers' or 'servers' object")
    imported, skipped, renamed = {}, [], {}
    for raw_name, raw in servers.items():
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", str(raw_name)).strip("-.")[:64] or "server"
        if not isinstance(raw, dict):
            skipped.append((raw_name, "entry is not an object"))
            continue
        if raw.get("disabled") is True:
            skipped.append((raw_name, "disabled in the source file"))
            continue
        entry = {k: raw[k] for k in ("command", "args", "env", "cwd", "url", "headers", "type", "timeout") if k in raw}
        if entry.get("type") == "stdio" or ("command" in entry and "type" in entry):
            entry.pop("type")  # VS Code writes type=stdio; ours is implied by 'command'
        if MCP_HTTP_TYPES.get(entry.get("type")) == "http":
            entry.pop("type")  # the default for a URL
        if "${input:" in json.dumps(entry):
            skipped.append((raw_name, "uses VS Code ${input:...} prompts; set an environment variable instead"))
            continue
        if "timeout" in entry and isinstance(entry["timeout"], (int, float)) and entry["timeout"] > 1000:
            entry["timeout"] = entry["timeout"] / 1000  # Cline/Cursor write milliseconds
        errors = validate_mcp_entry(name, entry)
        if name in imported:
            errors.append(f"name {name!r} occurs twice after sanitising")
        if errors:
            skipped.append((raw_name, "; ".join(errors)))
        else:
            imported[name] = entry
            if name != raw_name:
                renamed[name] = raw_name
    return imported, skipped, renamed


# The APIs an entry may opt in to have relayed to the server's own endpoint ("native"), rather
# than translated onto its chat completions: only for a server known to get them right (issue 17).
NATIVE_APIS = ("responses", "messages")
# field -> (check, what it must be). Unknown fields are refused so a typo cannot go unnoticed.
SERVER_FIELDS = {
    "name": (lambda v: isinstance(v, str) and NAME_RE.fullmatch(v), "a name of 1-64 [A-Za-z0-9._-]"),
    "url": (lambda v: isinstance(v, str) and valid_url(v) is None,
            "an http(s) URL with a host (and no user:password@: use api_key_env)"),
    "models": (_is_str_list, "a list of model ids"),
    "discover": (lambda v: isinstance(v, bool), "true or false"),
    "alias": (lambda v: v is None or (isinstance(v, str) and v and "/" not in v),
              "null or a public model name without '/'"),
    "api_key_env": (lambda v: v is None or (isinstance(v, str) and ENV_NAME_RE.fullmatch(v)),
                    "null or an environment variable name"),
    "api_key": (lambda v: v is None or (isinstance(v, str) and v), "null or a key"),
    "timeout": (lambda v: v is None or _is_number(v), "null or seconds > 0"),
    "connect_timeout": (lambda v: v is None or _is_number(v), "null or seconds > 0"),
    "max_concurrency": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)
                                                and v > 0), "null or an integer > 0"),
    "priority": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "mcp": (_is_str_list, "a list of MCP server names"),
    "vision": (lambda v: isinstance(v, bool), "true or false (its models read images)"),
    "stream_usage": (lambda v: isinstance(v, bool),
                     "true or false (ask it for a stream's usage, to count tokens; default "
                     "true)"),
    "native": (lambda v: _is_str_list(v) and len(set(v)) == len(v) and set(v) <= set(NATIVE_APIS),
               "a list of the APIs it speaks right itself, relayed untouched: "
               + " and/or ".join(f'"{api}"' for api in NATIVE_APIS)),
    # managed entries: llmhost starts the server itself (instead of "url")
    "command": (lambda v: isinstance(v, str) and v.strip(), "a command line"),
    "ttl": (lambda v: (v == 0 and not isinstance(v, bool)) or _is_number(v),
            "seconds >= 0 (0: never stop)"),
    "ready_path": (lambda v: isinstance(v, str) and v.startswith("/"), "a path such as /health"),
    "start_timeout": (_is_number, "seconds > 0"),
    "env": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
            "an object of strings"),
    "cwd": (lambda v: isinstance(v, str) and v, "a folder"),
    "group": (lambda v: isinstance(v, str) and NAME_RE.fullmatch(v), "a group name"),
}
MANAGED_FIELDS = ("command", "ttl", "ready_path", "start_timeout", "env", "cwd", "group")


def empty_registry():
    return {"version": REGISTRY_VERSION, "servers": [], "mcpServers": {}}


def validate_registry(doc, path):
    """Check the whole document; raise RegistryError naming the first bad field."""
    where = f"{path}:"
    if not isinstance(doc, dict):
        raise RegistryError(f"{where} the top level must be a JSON object")
    if doc.get("version") != REGISTRY_VERSION:
        raise RegistryError(f"{where} \"version\" must be {REGISTRY_VERSION} "
                            f"(found {doc.get('version')!r})")
    unknown = set(doc) - {"version", "servers", "mcpServers"}
    if unknown:
        raise RegistryError(f"{where} unknown top-level field(s): {', '.join(sorted(unknown))}")
    servers = doc.setdefault("servers", [])
    if not isinstance(servers, list):
        raise RegistryError(f"{where} \"servers\" must be a list")
    seen = set()
    for i, entry in enumerate(servers):
        label = f"{where} servers[{i}]"
        if not isinstance(entry, dict):
            raise RegistryError(f"{label} must be an object")
        label = f"{where} servers[{i}] ({entry.get('name', '?')})"
        if "name" not in entry:
            raise RegistryError(f"{label}: missing \"name\"")
        if ("url" in entry) == ("command" in entry):
            raise RegistryError(f"{label}: needs exactly one of \"url\" (a running server) or "
                                "\"command\" (one llmhost starts)")
        if "url" in entry and any(f in entry for f in MANAGED_FIELDS):
            raise RegistryError(f"{label}: {', '.join(f for f in MANAGED_FIELDS if f in entry)} "
                                "only apply to managed entries (with \"command\")")
        for field, value in entry.items():
            rule = SERVER_FIELDS.get(field)
            if rule is None:
                raise RegistryError(f"{label}: unknown field \"{field}\" "
                                    f"(known: {', '.join(SERVER_FIELDS)})")
            if not rule[0](value):
                shown = "" if field in ("api_key", "env") else hide_password(f", found {value!r}")
                raise RegistryError(f"{label}.{field}: must be {rule[1]}{shown}")
        if entry["name"] in seen:
            raise RegistryError(f"{label}: the name \"{entry['name']}\" is used twice")
        seen.add(entry["name"])
        if entry.get("alias") and len(entry.get("models", [])) != 1:
            raise RegistryError(f"{label}.alias: an alias needs exactly one model in \"models\"")
    mcp_servers = doc.setdefault("mcpServers", {})
    if not isinstance(mcp_servers, dict):
        raise RegistryError(f"{where} \"mcpServers\" must be an object")
    for name, entry in mcp_servers.items():
        errors = validate_mcp_entry(name, entry)
        if errors:
            raise RegistryError(f"{where} mcpServers.{name}: {'; '.join(errors)}")
    for entry in servers:
        for name in entry.get("mcp", ()):
            if name not in mcp_servers:
                raise RegistryError(f"{where} servers ({entry['name']}).mcp: no MCP server "
                                    f"named \"{name}\"")
    return doc


def parse_registry(text, path):
    def unique(pairs):  # a hand edit that repeats a key would lose the first copy on save
        doc = dict(pairs)
        if len(doc) < len(pairs):
            seen = set()
            repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise RegistryError(f"{path}: the key {repeated!r} appears twice in one object")
        return doc

    try:
        doc = json_loads(text, object_pairs_hook=unique)
    except ValueError as exc:
        where = f":{exc.lineno}:{exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise RegistryError(f"{path}{where}: not valid JSON: {getattr(exc, 'msg', exc)}") \
            from None
    return validate_registry(doc, path)


def load_registry(path):
    """The registry at `path`; a file that does not exist yet is an empty registry."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return empty_registry()
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path}: cannot read: {exc}") from None
    return parse_registry(text, path)


def registry_text(doc):
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def save_registry(path, doc):
    """Atomic replace: readers see the old file or the new one, never half of either. A
    symlinked registry stays a link: its target is what gets replaced."""
    validate_registry(doc, path)
    path = os.path.realpath(path)
    # literal secrets (an api_key, or env/header values that are not just ${VAR}): owner-only
    maps = [e.get("env", {}) for e in doc["servers"]] + [
        m for e in doc["mcpServers"].values() for m in (e.get("env", {}), e.get("headers", {}))]
    has_literal_key = any(entry.get("api_key") for entry in doc["servers"]) or any(
        re.fullmatch(r"(\$\{[^}]+\}|\s)*", str(v)) is None for m in maps for v in m.values())
    owner = None
    try:
        st = os.stat(path)
        mode, owner = st.st_mode & 0o777, (st.st_uid, st.st_gid)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    if has_literal_key:
        mode = 0o600  # a literal upstream key: only the owner may read the file
    replace_file(path, registry_text(doc), mode, ".servers.", owner)


def replace_file(path, text, mode, prefix, owner=None):
    """Replace `path` (a real path, not a link) by `text`, atomically: a temp file beside it
    (of `mode`, and of `owner` (uid, gid) where that is not us), fsynced, renamed over it, the
    rename made durable. Readers see the old file or the new one, never half of either."""
    import tempfile
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if owner is not None and owner != (os.geteuid(), os.getegid()):
                try:  # root editing a service user's file: it stays theirs (as sed -i and
                    os.fchown(f.fileno(), *owner)  # vim keep it), or their serve could not
                except OSError:  # read a 0600 file; anyone else cannot give a file away
                    pass
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


class RegistryLock:
    """An exclusive lock on `<registry>.lock`, so two `add`s in two shells cannot lose an entry."""

    def __init__(self, path):
        self.path = os.path.realpath(path) + ".lock"  # one lock for a link and its target
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: atomic replace still protects the file itself
            return self
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):  # (else the error would name the lock file)
            raise RegistryError(f"cannot write {os.path.abspath(self.path[:-5])}: the folder "
                                f"{folder} does not exist")
        nofollow = getattr(os, "O_NOFOLLOW", 0)  # never a link: root would open its target
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | nofollow, 0o600)
        except FileExistsError:
            try:
                self.fd = os.open(self.path, os.O_RDWR | nofollow)
            except OSError as exc:
                raise RegistryError(f"cannot lock {self.path}: " + (
                    "it is a symbolic link; remove it" if os.path.islink(self.path)
                    else exc.strerror or str(exc))) from None
        else:
            if os.geteuid() == 0:  # root, locking a service user's registry: the lock it just
                try:  # made is theirs too, or their next `add` could not open it
                    st = os.stat(self.path[:-5])
                    os.fchown(self.fd, st.st_uid, st.st_gid)
                except OSError:
                    pass
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def update_registry(path, change):
    """Lock, re-read, apply `change(doc)` (which may raise RegistryError), validate, save."""
    with RegistryLock(path):
        doc = load_registry(path)
        result = change(doc)
        save_registry(path, doc)
        return result


def refuse_managed_under_workers(servers):
    if any("command" in e for e in servers):
        raise RegistryError("managed servers (entries with --command) need --workers 1: each "
                            "worker would start its own copy of every model")


def find_server(doc, name):
    for entry in doc["servers"]:
        if entry["name"] == name:
            return entry
    return None

# =============================================================================
# Router
# =============================================================================
# Owns: public model name -> candidate upstreams, their order (priority, health, load,
# round-robin), health counters and cooldowns. Pure: no sockets; time comes from `clock`.
# Raises: NotFound for an unknown model.
# Never: sends anything (the Application does, in the order it is given).


class Upstream:
    """A registry entry as the router sees it, with its live health and load."""

    def __init__(self, entry, api_key):
        self.entry = entry
        self.name = entry["name"]
        self.managed = "command" in entry  # llmhost starts it; its port is chosen at each start
        self.api_key = api_key
        self.set_url(entry.get("url") or "http://127.0.0.1:0/v1")
        self.models = list(entry.get("models") or ())
        self.alias = entry.get("alias")
        self.native = frozenset(entry.get("native", ()))  # APIs relayed to its own endpoints
        self.priority = entry.get("priority", 0)
        self.max_concurrency = entry.get("max_concurrency")
        self.timeout = entry.get("timeout") or UPSTREAM_TIMEOUT
        self.connect_timeout = entry.get("connect_timeout") or CONNECT_TIMEOUT
        self.stream_usage = entry.get("stream_usage", True)  # ask streams for their usage
        self.in_flight = 0
        self.failures = 0  # consecutive
        self.cooldown_until = 0.0
        self.requests = 0
        self.errors = 0
        self.cooldowns = 0  # cooldowns entered (/metrics)
        self.last_error = None

    def set_url(self, url):
        self.origin = Origin(url)
        key = check_header_value(self.api_key) if self.api_key else None
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        # Built once per origin: the part of every upstream request head that never changes.
        # Accept-Encoding: identity, since without it any coding is acceptable (RFC 9110
        # §12.5.3) and llmhost reads some answers (tool loop, base64 embeddings, errors).
        host = f"Host: {self.origin.host_header}\r\n"
        rest = (f"User-Agent: llmhost/{__version__}\r\n"
                "Content-Type: application/json\r\nAccept-Encoding: identity\r\n")
        self.head_fixed = host + auth + rest
        # A Messages request relayed to the server's own /messages ("native"): Anthropic's API
        # takes the key as x-api-key, and a Bearer as an OAuth token it refuses ("Invalid
        # bearer token"); servers that copy the API (vLLM, llama.cpp, Ollama) read the Bearer
        # form. So both, but x-api-key alone to Anthropic itself.
        bearer = "" if self.origin.host.endswith(".anthropic.com") else auth
        self.heads = {None: self.head_fixed, "responses": self.head_fixed,
                      "messages": host + bearer + (f"x-api-key: {key}\r\n" if key else "")
                      + rest}

    def head(self, method, target, length=None, request_id=None, api=None, extra=""):
        """The head of a request to this server, the one place one is built: the fields every
        request to it carries (head_fixed; those of `api` for a request relayed to the server's
        own endpoint of that API), the length of a body and the client request's id. No field
        of the client's is copied, but the `extra` lines a native relay passes on."""
        return ("%s %s HTTP/1.1\r\n%s%s%s%s\r\n" % (
            method, target, self.heads[api], extra,
            "" if length is None else "Content-Length: %d\r\n" % length,
            "" if request_id is None else "X-Request-Id: %s\r\n" % request_id)
        ).encode("latin-1")

    def public_names(self):
        return [self.alias] if self.alias else self.models

    def full(self):
        return self.max_concurrency is not None and self.in_flight >= self.max_concurrency


class Router:
    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.upstreams = {}  # name -> Upstream
        self.table = {}  # public model name -> [(Upstream, upstream model id)]
        self.mcp_attached = False  # some entry gives its models MCP servers' tools
        self.turn = 0  # round-robin among equals

    def load(self, entries, api_keys):
        """Replace the entries. Unchanged entries keep their health; in-flight requests keep the
        Upstream object they started with, so they finish where they began."""
        upstreams = {}
        for entry in entries:
            old = self.upstreams.get(entry["name"])
            key = api_keys.get(entry["name"])
            if old is not None and old.entry == entry and old.api_key == key:
                upstreams[old.name] = old
            else:
                upstreams[entry["name"]] = Upstream(entry, key)
        self.upstreams = upstreams
        self.rebuild()

    def rebuild(self):
        self.mcp_attached = any(up.entry.get("mcp") for up in self.upstreams.values())
        table = {}
        for up in self.upstreams.values():
            if up.alias:
                table.setdefault(up.alias, []).append((up, up.models[0]))
            else:
                for model in up.models:
                    table.setdefault(model, []).append((up, model))
        self.table = table

    def pool(self, model):
        """-> the (Upstream, upstream model id) pairs serving `model`, in no particular order."""
        pool = self.table.get(model)
        if pool is None:
            server, _, rest = model.partition("/")  # "server/model" pins one server
            up = self.upstreams.get(server)
            if up is not None and rest:
                if rest == up.alias:
                    pool = [(up, up.models[0])]
                elif rest in up.models or (not up.models and up.entry.get("discover")):
                    pool = [(up, rest)]
        if pool is None:
            known = sorted(self.table)
            hint = (f" Known models: {', '.join(known[:8])}{' …' if len(known) > 8 else ''}."
                    if known else " No models are registered: see `llmhost.py add --help`.")
            raise NotFound(f"The model '{model}' does not exist.{hint}", code="model_not_found",
                           param="model")
        return pool

    def all_full(self, model):
        """Whether resolve()'s first candidate would be at its max_concurrency: every server
        of `model` not cooling down is (or every server, when all are cooling down)."""
        pool = self.pool(model)
        if len(pool) == 1:  # the usual case, and this runs for every request
            return pool[0][0].full()
        now = self.clock()
        warm = [up for up, _ in pool if up.cooldown_until <= now] or [up for up, _ in pool]
        return all(up.full() for up in warm)

    def resolve(self, model):
        """-> the candidates for `model` in the order to try them."""
        pool = self.pool(model)
        if len(pool) == 1:
            return pool
        now = self.clock()
        self.turn += 1
        n = len(pool)
        ranked = sorted(range(n), key=lambda i: (
            pool[i][0].cooldown_until > now,  # cooling servers only as a last resort
            pool[i][0].full(),  # a full server waits behind lower-priority free ones
            pool[i][0].priority,  # lower first: a remote fallback gets priority 10
            pool[i][0].in_flight,  # least busy
            (i - self.turn) % n))  # ties: round-robin
        return [pool[i] for i in ranked]

    def succeeded(self, up):
        up.failures = 0

    def failed(self, up, reason):
        """A failure of `up` (logged, as nginx's error log says "upstream prematurely closed")."""
        up.failures += 1
        up.errors += 1
        up.last_error = reason
        if up.failures >= FAILURES_BEFORE_COOLDOWN:
            extra = up.failures - FAILURES_BEFORE_COOLDOWN
            cooldown = min(COOLDOWN_MAX, COOLDOWN_BASE * 2 ** min(extra, 16))
            up.cooldown_until = self.clock() + cooldown
            up.cooldowns += 1
            logger().warning("server %s: %s (%d failures in a row); cooling down for %gs",
                             up.name, reason, up.failures, cooldown)
        else:
            logger().warning("server %s: %s", up.name, reason)

    def rate_limited(self, up, retry_after):
        up.errors += 1
        up.last_error = "HTTP 429"
        cooldown = min(COOLDOWN_MAX, max(1.0, retry_after))
        up.cooldown_until = self.clock() + cooldown
        up.cooldowns += 1
        logger().warning("server %s: HTTP 429 (rate limited); cooling down for %gs", up.name,
                         cooldown)

    def recovered(self, up):
        up.failures = 0
        up.cooldown_until = 0.0

    def cooling(self):
        now = self.clock()
        return [up for up in self.upstreams.values() if up.cooldown_until > now]

    def public_models(self):
        """[(public name, [server names])] in a stable order."""
        return [(name, [up.name for up, _ in pool]) for name, pool in sorted(self.table.items())]


def parse_retry_after(value, default=COOLDOWN_BASE):
    try:
        return float(value)
    except (TypeError, ValueError):
        return default  # an HTTP-date is rare from model servers; use the default


# =============================================================================
# Managed servers
# =============================================================================
# Owns: model servers llmhost starts itself (entries with "command"): one shared start per
# server (single flight), readiness polling, idle stop after `ttl`, the --max-running bound
# (stopping the least recently used *idle* server, never one with requests in flight), output
# kept in a bounded log beside the registry, and a pid file so a killed serve's children are
# reaped on the next start. Processes run in their own session: stops signal the whole group.
# Each server's state changes only through ManagedServer.move(), along MANAGED_MOVES.
# Raises: ServiceUnavailable (503, with the last lines of the server's output).


def expand_command(command, port, model, environ):
    """${PORT}, ${MODEL} and ${env.VAR} in a managed entry's command line -> argv."""
    import shlex

    def sub(m):
        key = m.group(1)
        if key == "PORT":
            return str(port)
        if key == "MODEL":
            return model or ""
        if key.startswith("env.") and key[4:] in environ:
            return environ[key[4:]]
        raise ValueError(f"${{{key}}} is not set")

    # split first, then expand: a value with spaces or quotes stays one argument
    return [os.path.expanduser(re.sub(r"\$\{([A-Za-z0-9_.]+)\}", sub, arg))
            for arg in shlex.split(command)]


def check_command(command, environ):
    """None if the first word of `command` is a runnable program, else why not."""
    import shutil
    try:
        argv = expand_command(command, 1, "model", environ)
    except ValueError as exc:
        return str(exc)
    if not argv:
        return "the command is empty"
    found = shutil.which(argv[0], path=environ.get("PATH", os.defpath))
    if found is None:
        return f"{argv[0]!r} is not an executable file (nor found on PATH)"
    return None


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logs_folder(registry):
    return os.path.join(os.path.dirname(os.path.abspath(registry)), "llmhost-logs")


class ManagedState:
    """A managed server's states; the strings are what /v1/status, `ps` and /v1/models show.
    STOPPED: no process, or one that exited and was reaped. STARTING: making room, spawning,
    polling readiness. RUNNING: ready, requests go to it. STOPPING: its process group is being
    signalled. FAILED: its start failed or it crashed; the next start waits out a backoff."""
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    FAILED = "failed"


# The moves ProcessManager makes, from each state, and what makes each; anything else is a bug
# (see ManagedServer.move).
MANAGED_MOVES = {
    ManagedState.STOPPED: frozenset({
        # A request, or load, starts it.
        ManagedState.STARTING,
        # stop() again of one already stopped: unload, removal, shutdown.
        ManagedState.STOPPED,
        # A start failed after stop() reaped what it had spawned.
        ManagedState.FAILED,
    }),
    ManagedState.STARTING: frozenset({
        # It became ready.
        ManagedState.RUNNING,
        # Its command could not be expanded or run.
        ManagedState.FAILED,
        # Not ready in time, another model, removed, unloaded, or shutdown.
        ManagedState.STOPPING,
        # stop() of a process that already exited while it started.
        ManagedState.STOPPED,
    }),
    ManagedState.RUNNING: frozenset({
        # Idle past its ttl, making room, unload, removal, shutdown.
        ManagedState.STOPPING,
        # Its process exited on its own.
        ManagedState.FAILED,
        # stop() found its process already gone, before its watcher did.
        ManagedState.STOPPED,
        # ensure() found its process gone before its watcher did, and starts it again.
        ManagedState.STARTING,
    }),
    ManagedState.STOPPING: frozenset({
        # Its process group is gone.
        ManagedState.STOPPED,
        # A second stop(): idle_check() marks it before the stop() it spawns runs.
        ManagedState.STOPPING,
        # A request came while it stopped: start() waits for the old process to exit.
        ManagedState.STARTING,
    }),
    ManagedState.FAILED: frozenset({
        # Tried again once its backoff is over.
        ManagedState.STARTING,
    }),
}


class Stateful:
    """Named states set in one place, move(), along a table of the moves it allows (h11's
    _state.py). A move the table does not list is a bug: logged at ERROR with both states and
    why, and made all the same (each kind says why that is the safer choice); a name the table
    does not know is a typo, not a race: ValueError."""
    MOVES = {}  # state -> the states it may move to
    KIND = TABLE = ""  # how log lines name one ("managed server"), and its table

    @property
    def state(self):
        return self._state

    def log(self):
        return logger()

    def move(self, to, why):
        if to not in self.MOVES:
            raise ValueError(f"{self.KIND} {self.name}: no state {to!r}")
        if to in self.MOVES[self._state]:
            self.log().debug("%s %s: %s -> %s (%s)", self.KIND, self.name, self._state, to, why)
        else:
            self.log().error("%s %s: bug: state %s -> %s is not a move %s allows (%s)",
                             self.KIND, self.name, self._state, to, self.TABLE, why)
        self._state = to


class ManagedServer(Stateful):
    """One managed entry's process; its state changes only through move()."""

    # A move outside the table is made all the same: the caller has already acted on the
    # process (spawned, signalled or reaped it), and ensure(), make_room() and idle_check() act
    # on the state, so one kept against the process can wedge a server (a ready process kept
    # "stopped" is never used: each request starts it anew and waits for it to exit), while a
    # wrong move made and logged keeps the gateway serving and says what to fix.
    MOVES, KIND, TABLE = MANAGED_MOVES, "managed server", "MANAGED_MOVES"

    def move(self, to, why):
        before = self._state
        super().move(to, why)
        if to != before:  # (counted for /metrics' transitions)
            self.entered[to] = self.entered.get(to, 0) + 1

    def __init__(self, up, log_path):
        self.up = up
        self.name = up.name
        self.log_path = log_path
        self._state = ManagedState.STOPPED
        self.proc = None
        self.port = None
        self.started_at = None
        self.last_used = time.monotonic()
        self.starting = None  # the shared start (asyncio.Task) while one is under way
        self.watcher = None  # the task that notices the process exit
        self.failures = 0
        self.retry_at = 0.0
        self.last_error = None
        self.entered = {}  # state -> times it moved into it from another (/metrics)


    def info(self, now):
        return {"name": self.name, "state": self.state,
                "pid": self.proc.pid if self.proc and self.state != ManagedState.STOPPED else None,
                "port": self.port if self.state in (ManagedState.STARTING, ManagedState.RUNNING)
                else None,
                "uptime_seconds": round(now - self.started_at, 1)
                if self.started_at and self.state == ManagedState.RUNNING else None,
                "idle_seconds": round(now - self.last_used, 1) if not self.up.in_flight else 0,
                "in_flight": self.up.in_flight, "ttl": self.up.entry.get("ttl", MANAGED_TTL),
                "last_error": self.last_error}

    def log_tail(self, lines=12):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 8192))
                return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return ""


class ProcessManager:
    def __init__(self, registry, environ, client, max_running=None):
        self.registry = registry
        self.environ = environ
        self.client = client
        self.max_running = max_running
        self.servers = {}  # name -> ManagedServer
        self.group_locks = {}  # group -> asyncio.Lock: one start at a time makes room
        self.retired = set()  # removed from the registry, stopped once their requests end
        self.next_trim = 0.0
        self.pid_file = os.path.abspath(registry) + ".pids"
        self.owner_mark = os.path.abspath(registry)  # in each child's env, to find them again

    def sync(self, upstreams):
        """The registry was (re)loaded: know the managed entries; forget (and stop) the rest."""
        gone = []
        for name, server in list(self.servers.items()):
            up = upstreams.get(name)
            if up is None or up.entry != server.up.entry:
                del self.servers[name]
                gone.append(server)
                self.retired.add(server)
        for up in upstreams.values():
            if up.managed:
                server = self.servers.get(up.name)
                if server is None:
                    self.servers[up.name] = ManagedServer(up, os.path.join(
                        logs_folder(self.registry), f"{up.name}.log"))
                else:
                    server.up = up
                    if server.port:
                        up.set_url(f"http://127.0.0.1:{server.port}/v1")
        return gone

    async def ensure(self, up):
        """Return once `up`'s process is ready; start it (once, whoever asks) if it is not."""
        import asyncio
        server = self.servers.get(up.name)
        if server is None:
            raise ServiceUnavailable(f"managed server {up.name} is no longer registered")
        server.last_used = time.monotonic()
        if server.state == ManagedState.RUNNING and server.proc.returncode is None:
            return
        if server.starting is None:
            server.starting = asyncio.get_running_loop().create_task(self.start(server))
            server.starting.add_done_callback(lambda _t: setattr(server, "starting", None))
        await asyncio.shield(server.starting)

    def fail(self, server, message):
        server.move(ManagedState.FAILED, message)
        server.failures += 1
        server.retry_at = time.monotonic() + min(MANAGED_BACKOFF_MAX, 2.0 ** (server.failures - 1))
        tail = server.log_tail()
        server.last_error = message
        logger().warning("managed server %s: %s", server.name, message)
        return ServiceUnavailable(f"managed server {server.name}: {message}" +
                                  (f"; its last output:\n{tail}" if tail else ""),
                                  code="server_start_failed")

    async def start(self, server):
        import asyncio
        import subprocess
        up = server.up
        entry = up.entry
        wait = server.retry_at - time.monotonic()
        if server.state == ManagedState.FAILED and wait > 0:
            raise ServiceUnavailable(f"managed server {server.name} failed to start "
                                     f"({server.last_error}); next try in {wait:.0f}s",
                                     code="server_start_failed", headers=[
                                         ("Retry-After", str(int(wait) + 1))])
        lock = self.group_locks.setdefault(entry.get("group"), asyncio.Lock())
        async with lock:  # starts queue in order; each makes room before the next looks
            await self.make_room(server)
            server.move(ManagedState.STARTING, "a start")
        old = server.proc
        if old is not None and old.returncode is None:
            await old.wait()  # a stop is under way: never two copies of one server at once
        port = free_port()
        try:
            argv = expand_command(entry["command"], port, up.models[0] if up.models else "",
                                  self.environ)
        except ValueError as exc:
            raise self.fail(server, str(exc)) from None
        os.makedirs(os.path.dirname(server.log_path), exist_ok=True)
        self.trim_log(server.log_path)
        env = dict(self.environ, **entry.get("env", {}), LLMHOST_OWNER=self.owner_mark)
        fd = os.open(server.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as log:  # its output may hold secrets: owner-only
            # the command as registered, not expanded: ${env.VAR} values stay out of the log
            log.write(f"--- llmhost: starting {entry['command']} (port {port})\n".encode())
            log.flush()
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=os.path.expanduser(entry["cwd"]) if entry.get("cwd") else None, env=env,
                    start_new_session=True)  # its own process group: stopped as a whole
            except OSError as exc:
                raise self.fail(server, f"cannot run {argv[0]}: {exc.strerror or exc}") from None
        server.proc, server.port = proc, port
        server.watcher = asyncio.get_running_loop().create_task(self.watch(server, proc))
        self.write_pids()
        if self.servers.get(server.name) is not server:  # removed from the registry meanwhile
            await self.stop(server, "removed from the registry while starting")
            raise ServiceUnavailable(f"managed server {server.name} was removed")
        up.set_url(f"http://127.0.0.1:{port}/v1")
        logger().info("managed server %s: started pid %d on port %d", server.name, proc.pid, port)
        start_timeout = entry.get("start_timeout", MANAGED_START_TIMEOUT)
        deadline = time.monotonic() + start_timeout
        answered_since = None  # when it first listed models without ours
        while True:
            if proc.returncode is not None:
                # Unloaded or removed meanwhile: not a failure of the server, no backoff.
                if server.state in (ManagedState.STOPPING, ManagedState.STOPPED):
                    raise ServiceUnavailable(
                        f"managed server {server.name} was stopped while it started",
                        code="server_stopped")
                await self.stop(server, "exited while starting")  # what it left in its group
                raise self.fail(server, f"exited with code {proc.returncode} while starting")
            if time.monotonic() > deadline:
                await self.stop(server, "did not become ready")
                raise self.fail(server, f"not ready after {start_timeout:g}s")
            ok, ids = await self.ready(up)
            if ok:
                break
            if ids is not None:  # up, but another model: a wrong --model, not a slow start
                answered_since = answered_since or time.monotonic()
                if time.monotonic() - answered_since > MANAGED_MODEL_GRACE:
                    await self.stop(server, "does not serve its model")
                    raise self.fail(server, f"it serves {', '.join(ids[:5]) or 'no model'}, "
                                    f"not {', '.join(up.models)}: fix --model (llama.cpp lists "
                                    "the .gguf path; `add --check` finds the names)")
            await asyncio.sleep(0.1)
        server.move(ManagedState.RUNNING, f"ready, pid {proc.pid}")
        server.started_at = server.last_used = time.monotonic()
        server.failures = 0
        server.last_error = None
        logger().info("managed server %s: ready", server.name)

    async def ready(self, up):
        """-> (ready, the model ids it lists or None): the ready path answers 200 and /models
        lists the model (llama.cpp answers 503 while it loads the model)."""
        try:
            status, _ = await fetch_json(self.client, up, up.entry.get("ready_path", "/health"),
                                         2.0)
            if status != 200:
                return False, None
            status, doc = await fetch_models(self.client, up, 2.0)
        except UpstreamError:
            return False, None
        ids = list_models(doc) if status == 200 else None
        return ids is not None and (not up.models or up.entry.get("discover") or
                                    any(m in ids for m in up.models)), ids

    async def watch(self, server, proc):
        import signal
        await proc.wait()
        if server.proc is proc and server.state == ManagedState.RUNNING:
            server.last_error = f"exited with code {proc.returncode}"
            server.move(ManagedState.FAILED, server.last_error)
            logger().warning("managed server %s exited with code %s", server.name,
                             proc.returncode)
            try:  # what the crashed server started (a wrapper's llama-server) goes with it
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.write_pids()

    async def make_room(self, server):
        """Under --max-running: stop the least recently used idle server of the same group;
        if every running one has requests in flight, wait for one to go idle."""
        import asyncio
        if not self.max_running:
            return
        group = server.up.entry.get("group")
        deadline = time.monotonic() + server.up.entry.get("start_timeout", MANAGED_START_TIMEOUT)
        while True:
            running = [s for s in self.servers.values() if s is not server and
                       s.state in (ManagedState.RUNNING, ManagedState.STARTING,
                                   ManagedState.STOPPING) and
                       s.up.entry.get("group") == group]
            if len(running) < self.max_running:
                return
            idle = [s for s in running if s.state == ManagedState.RUNNING and not s.up.in_flight]
            if idle:
                await self.stop(min(idle, key=lambda s: s.last_used), "making room")
            elif time.monotonic() > deadline:
                raise ServiceUnavailable(
                    f"managed server {server.name} waited for a free slot (--max-running "
                    f"{self.max_running}) too long: the running ones stay busy",
                    code="server_start_failed", headers=[("Retry-After", "5")])
            else:
                await asyncio.sleep(0.05)

    async def stop(self, server, reason):
        """SIGTERM the process group, SIGKILL after a grace period."""
        import asyncio
        import signal
        proc = server.proc
        if proc is None:
            return
        if proc.returncode is None:
            server.move(ManagedState.STOPPING, reason)
            logger().info("managed server %s: stopping (%s)", server.name, reason)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    break
                try:
                    await asyncio.wait_for(proc.wait(), MANAGED_STOP_GRACE)
                    break
                except asyncio.TimeoutError:
                    continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything the server left in its group
        except (ProcessLookupError, PermissionError):
            pass
        # Not if a new one started since (start() says "starting" before it waits for this
        # process to end, and spawns after); and a crash stays "failed", so the next start
        # waits out its backoff.
        if server.proc is proc and server.state not in (ManagedState.FAILED,
                                                        ManagedState.STARTING):
            server.move(ManagedState.STOPPED, f"stopped ({reason})")
            server.port = None
        self.write_pids()

    async def stop_all(self):
        import asyncio
        everything = list(self.servers.values()) + list(self.retired)
        await asyncio.gather(*(self.stop(s, "shutting down") for s in everything))

    def idle_check(self, now, spawn):
        if now >= self.next_trim:  # a chatty server's log stays bounded while it runs too
            self.next_trim = now + 60
            for server in self.servers.values():
                self.trim_log(server.log_path)
        for server in self.servers.values():
            ttl = server.up.entry.get("ttl", MANAGED_TTL)
            if server.state == ManagedState.RUNNING and ttl and not server.up.in_flight and \
                    now - server.last_used > ttl:
                server.move(ManagedState.STOPPING, f"idle for {ttl:g}s")
                spawn(self.stop(server, f"idle for {ttl:g}s"))

    def write_pids(self):
        pids = {str(s.proc.pid): s.name for s in self.servers.values()
                if s.proc is not None and s.proc.returncode is None}
        try:
            if pids:
                with open(self.pid_file, "w") as f:
                    json.dump(pids, f)
            elif os.path.exists(self.pid_file):
                os.unlink(self.pid_file)
        except OSError as exc:
            logger().warning("cannot write %s: %s", self.pid_file, exc)

    def reap_orphans(self):
        """Children of a serve that was killed (SIGKILL) are found by the pid file and the
        LLMHOST_OWNER mark in their environment (so a reused pid is never hit), and stopped."""
        import signal
        try:
            with open(self.pid_file) as f:
                pids = json.load(f)
        except (OSError, ValueError):
            return []
        reaped = []
        for pid in pids:
            try:
                with open(f"/proc/{int(pid)}/environ", "rb") as f:
                    marked = f"LLMHOST_OWNER={self.owner_mark}".encode() in f.read().split(b"\0")
                if marked:
                    os.killpg(int(pid), signal.SIGKILL)
                    reaped.append(int(pid))
            except (OSError, ValueError):
                continue
        try:
            os.unlink(self.pid_file)
        except OSError:
            pass
        return reaped

    @staticmethod
    def trim_log(path):
        """Keep the log bounded: past MANAGED_LOG_BYTES, keep its second half."""
        try:
            if os.path.getsize(path) > MANAGED_LOG_BYTES:
                with open(path, "rb") as f:
                    f.seek(-MANAGED_LOG_BYTES // 2, os.SEEK_END)
                    tail = f.read()
                with open(path, "wb") as f:
                    f.write(tail)
        except OSError:
            pass


# =============================================================================
# Admission
# =============================================================================
# Owns: the global concurrency limit and its bounded FIFO wait queue.
# Raises: RateLimited (429 + Retry-After) when the queue is full or the wait too long.


async def wait_unless_gone(fut, timeout, conn):
    """asyncio.wait_for(fut, timeout), but a client on `conn` that leaves meanwhile cancels
    `fut` and raises ClientGone (a queue does not keep places for clients that are gone)."""
    import asyncio
    if conn is None:
        return await asyncio.wait_for(fut, timeout)
    conn.on_gone = fut.cancel
    if conn.gone:  # it left before it queued (while MCP servers started, say)
        fut.cancel()
    try:
        return await asyncio.wait_for(fut, timeout)
    except asyncio.CancelledError:
        if conn.gone and fut.cancelled():
            raise ClientGone("client closed the request while it waited") from None
        raise
    finally:
        conn.on_gone = None


class Admission:
    def __init__(self, limit=MAX_CONCURRENCY, queue_size=QUEUE_SIZE, queue_timeout=QUEUE_TIMEOUT):
        from collections import deque
        self.limit = limit
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.active = 0
        self.waiters = deque()
        self.rejected = 0
        self.others = lambda: 0  # requests queued elsewhere that count toward queue_size
        self.whose = ""  # under --workers: whose limits these are (a worker's share)

    def queued(self):
        return sum(1 for fut in self.waiters if not fut.done()) + self.others()

    async def acquire(self, conn=None, deadline=None):
        """A slot, at once or after a wait in line (until `deadline`, by default the queue
        timeout from now). If the client on `conn` leaves while it waits, its place is given up
        at once (ClientGone), not when its turn comes."""
        import asyncio
        if self.active < self.limit and not self.waiters:
            self.active += 1
            return
        if self.queued() >= self.queue_size:
            self.rejected += 1
            raise RateLimited(f"llmhost is at its limit of {self.limit} concurrent requests and "
                              f"{self.queue_size} queued{self.shared()}; retry shortly",
                              headers=[("Retry-After", "1")])
        timeout = self.queue_timeout if deadline is None else deadline - time.monotonic()
        if timeout <= 0:  # it already waited its time elsewhere (for its model's servers)
            raise self.waited_too_long()
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await wait_unless_gone(fut, timeout, conn)
        except asyncio.TimeoutError:
            if fut.done() and not fut.cancelled():
                return  # handed the slot as the wait ran out (wait_for on 3.12+): keep it
            raise self.waited_too_long() from None
        except (asyncio.CancelledError, ClientGone):
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed to us as we were cancelled: pass it on
            raise

    def waited_too_long(self):
        self.rejected += 1
        return RateLimited(f"waited {self.queue_timeout:g}s for one of {self.limit} request "
                           f"slots{self.shared()}; retry shortly", headers=[("Retry-After", "1")])

    def shared(self):
        return f" ({self.whose})" if self.whose else ""

    def release(self):
        waiters = self.waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to the next in line
                return
        self.active -= 1


# =============================================================================
# Auth
# =============================================================================
# Owns: the optional API keys clients must present. Constant-time comparison; the supplied
# key is never logged or echoed.


def check_api_key(headers, keys):
    """-> the configured key the request's matches; Unauthorized if none does."""
    import hmac
    send = "send 'Authorization: Bearer <key>' or 'x-api-key'."
    auth = headers.get("authorization", "")
    # Only SP and HTAB are blanks around a field value (RFC 9110 §5.6.3): str.strip() would
    # also take \xa0 and \x85, bytes that end the UTF-8 of 'à' or 'Å'.
    if auth[:7].lower() == "bearer ":
        supplied = auth[7:].strip(" \t")
    elif "x-api-key" in headers:
        supplied = headers["x-api-key"].strip(" \t")
    elif len(auth.split()) > 1:  # (one word may be a key sent without "Bearer ": not echoed)
        raise Unauthorized(f"Authorization scheme {auth.split()[0][:20]!r} is not supported: "
                           + send)
    elif auth and auth.lower() != "bearer":
        raise Unauthorized("Authorization needs the scheme: " + send)
    else:
        supplied = ""
    if not supplied:
        raise Unauthorized("Missing API key: " + send)
    # Field values were read as latin-1, so this gives back the bytes the client sent. A key
    # matches as UTF-8 (curl sends it so) and, if it can be, as latin-1 (http.client, fetch
    # and browsers send a key made of latin-1 characters so). surrogateescape: the bytes of a
    # key from an environment or command line that was not UTF-8.
    given = supplied.encode("latin-1")
    matched = None
    for key in keys:  # compare against every key: the time does not say which one was close
        ok = hmac.compare_digest(given, key.encode("utf-8", "surrogateescape"))
        if not key.isascii() and max(key) <= "\xff":
            ok |= hmac.compare_digest(given, key.encode("latin-1"))
        if ok and matched is None:
            matched = key
    if matched is None:
        raise Unauthorized("Incorrect API key provided.")
    return matched


_KEY_LABEL = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def read_api_keys_file(path):
    """--api-keys-file: one `LABEL KEY` per line (blank lines and # comments skipped) ->
    {key: label}. The file must be private (mode 0600, as ssh wants of a key): it holds keys,
    and it keeps them out of the process list. Raises ValueError saying what is wrong (never
    quoting a key)."""
    import stat
    try:
        info = os.stat(path)
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if info.st_mode & 0o077:
        raise ValueError(f"{path} is readable by others (mode {stat.S_IMODE(info.st_mode):04o}): "
                         f"it holds keys; chmod 600 {path}")
    labels = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        label, _, key = line.partition(" ")
        key = key.strip()
        if not _KEY_LABEL.fullmatch(label) or not key or " " in key:
            raise ValueError(f"{path}:{number}: expected 'LABEL KEY' (a label of letters, "
                             "digits, _.@-, then one key)")
        if key in labels:
            raise ValueError(f"{path}:{number}: this key is also on a line labelled "
                             f"{labels[key]!r}")
        labels[key] = label
    if not labels:
        raise ValueError(f"{path} holds no key")
    return labels

# =============================================================================
# MCP bridge
# =============================================================================
# Owns: one `mcp.Client` per configured MCP server (stdio, streamable HTTP, legacy SSE), each
#   entered and exited by ONE owner task (the SDK's anyio scopes hang if exited from another
#   task); the tool cache and its refresh on list_changed; turning tool results into what an
#   OpenAI model reads; answering server-initiated sampling/elicitation/roots requests. Each
#   connection's state changes only through _MCPConn.move(), along MCP_MOVES.
# Raises: MCPError (server unknown, cannot start, cannot connect) only. A tool that fails,
#   times out or loses its connection is a result with ok=False, never an exception.
# Never: imports `mcp` at module import (~0.6-1 s, ~580 modules) - only inside functions, and
#   only once an MCP server is used (or attached to a model: warm() connects those at start,
#   importing in a thread); reads os.environ except through the CLI helpers'
#   defaults; logs header values, env values, prompts or sampled text.


def mcp_log():
    import logging
    return logging.getLogger("llmhost.mcp")


MCP_LOG_LEVEL = "info"  # 2026 servers send logs only to requests that opt in at a level


class MCPError(HTTPError):
    """An MCP server is unknown, cannot be started or cannot be reached; the message names it."""
    status, type, code = 502, "server_error", "mcp_server_unavailable"

    def __init__(self, server, message):
        super().__init__(f"MCP server {server!r}: {message}")
        self.server = server


class MCPRemoteError(MCPError):
    """A request sent on to an MCP server failed there: its JSON-RPC error, a timeout
    (MCP_TIMEOUT_CODE), a lost connection; `rpc` is the JSON-RPC error object to pass on."""

    def __init__(self, code, message, data=None):
        HTTPError.__init__(self, message)
        self.server = None
        self.rpc = {"code": code, "message": message}
        if data is not None:
            self.rpc["data"] = data


MCP_TIMEOUT_CODE = -32001  # the SDK's REQUEST_TIMEOUT
MCP_INTERNAL_CODE = -32603  # JSON-RPC's internal error
MCP_PARAMS_CODE = -32602  # JSON-RPC's invalid params
MCP_META = "io.modelcontextprotocol/"  # the 2026 keys of _meta: protocolVersion, clientInfo...


# ---- pure helpers ----------------------------------------------------------------------------

_ENV_REF = re.compile(r"\$\{(?:env:)?([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value, environ):
    """Expand `${VAR}`, `${env:VAR}` (VS Code) and `${VAR:-default}`; an unset VAR without a
    default raises KeyError(VAR), so a missing secret is reported, not sent as ''."""

    def sub(m):
        if m.group(1) in environ:
            return environ[m.group(1)]
        if m.group(2) is not None:
            return m.group(2)
        raise KeyError(m.group(1))

    return _ENV_REF.sub(sub, value)


def _name_part(s):
    return re.sub(r"[^A-Za-z0-9_-]", "_", s)


def mcp_tool_name(server, tool, taken):
    """`<server>__<tool>` as an OpenAI function name, unique within `taken` (which it updates).
    Too long or already taken: cut and add a hash of the *original* pair, so the same server
    and tool get the same name on every request given the same order."""
    base = f"{_name_part(server)}__{_name_part(tool)}"
    if len(base) <= MCP_NAME_MAX and base not in taken:
        taken.add(base)
        return base
    import hashlib
    digest = hashlib.sha256(f"{server}\0{tool}".encode()).hexdigest()
    for i in range(0, len(digest) - 8):  # another hash window on the (astronomically rare) clash
        name = f"{base[:MCP_NAME_MAX - 9]}_{digest[i:i + 8]}"
        if name not in taken:
            taken.add(name)
            return name
    raise ValueError("no free tool name")  # unreachable in practice


def _describe_exc(exc):
    """One line for an exception, unwrapping anyio's nested ExceptionGroups to the leaf causes."""
    try:
        from builtins import BaseExceptionGroup as group  # Python 3.11+
    except ImportError:
        try:
            from exceptiongroup import BaseExceptionGroup as group  # anyio's backport on 3.10
        except ImportError:
            group = ()
    if isinstance(exc, group):
        leaves = []
        for sub in exc.exceptions:
            leaf = _describe_exc(sub)
            if leaf not in leaves:
                leaves.append(leaf)
        return "; ".join(leaves)
    msg = getattr(exc, "message", None) or str(exc)
    if type(exc).__name__ == "ValidationError":  # pydantic's: a line per failed alternative
        msg = "the server's answer is malformed (%s)" % msg.split("\n", 1)[0]
    # httpx names the URL it was sent to, password included, in its errors.
    return hide_password(f"{type(exc).__name__}: {msg}") if msg else type(exc).__name__


# What a streamable-HTTP server answers for a session it does not know (it restarted): the
# SDK's stand-in for a bare 404, the Python SDK's and the TypeScript SDK's own bodies. Each is
# a refusal before the request is handled, so it is safe to send the request once more.
MCP_SESSION_REFUSALS = {"Session terminated", "Session not found",
                        "Bad Request: No valid session ID provided"}


def _session_refused(exc, transport):
    """Whether an SDK error says an HTTP server refused our session (it restarted and forgot
    it). The spec's answer is a new session and one more try. Nothing broader: an error after
    a tool ran must not make it run twice."""
    return transport == "http" and type(exc).__module__.startswith("mcp.") and \
        getattr(exc, "message", None) in MCP_SESSION_REFUSALS


def _cut_result(text):
    """A tool result's text, cut to MCP_RESULT_MAX characters with a note saying so."""
    if not isinstance(text, str) or len(text) <= MCP_RESULT_MAX:
        return text
    return (f"{text[:MCP_RESULT_MAX]}\n[llmhost: the result was cut to {MCP_RESULT_MAX} of "
            f"{len(text)} characters]")


def _dump(model):
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


def _b64_size(data):
    return len(data) * 3 // 4 - data[-2:].count("=")


def mcp_result_to_openai(result):
    """A CallToolResult as (text, parts): text is what any model reads (text blocks joined;
    structuredContent as JSON when there is no text; media described); parts are OpenAI content
    parts (text + image_url data URLs + input_audio), for vision/audio-capable models."""
    texts, media = [], []
    for block in result.content or []:
        kind = getattr(block, "type", "")
        if kind == "text":
            texts.append(block.text)
        elif kind == "image":
            texts.append(f"[image: {block.mime_type}, {_b64_size(block.data)} bytes]")
            media.append({"type": "image_url", "image_url": {"url": f"data:{block.mime_type};base64,{block.data}"}})
        elif kind == "audio":
            texts.append(f"[audio: {block.mime_type}, {_b64_size(block.data)} bytes]")
            fmt = block.mime_type.rsplit("/", 1)[-1].replace("mpeg", "mp3").replace("x-wav", "wav")
            if fmt in ("wav", "mp3"):  # the only formats chat completions' input_audio accepts
                media.append({"type": "input_audio", "input_audio": {"data": block.data, "format": fmt}})
        elif kind == "resource_link":
            texts.append(f"[resource: {block.name} {block.uri}]")
        elif kind == "resource":
            res = block.resource
            if getattr(res, "text", None) is not None:
                texts.append(res.text)
            else:
                texts.append(f"[resource: {res.uri} {res.mime_type or 'binary'}]")
    if not any(getattr(b, "type", "") == "text" for b in result.content or []) \
            and result.structured_content is not None:
        texts.insert(0, json.dumps(result.structured_content, ensure_ascii=False))
    text = "\n".join(texts)
    return text, [{"type": "text", "text": text}] + media


def _sampling_to_openai(params):
    """CreateMessageRequestParams -> OpenAI chat messages (system prompt first)."""
    messages = [{"role": "system", "content": params.system_prompt}] if params.system_prompt else []
    for m in params.messages:
        parts = []
        for block in m.content if isinstance(m.content, list) else [m.content]:
            kind = getattr(block, "type", "")
            if kind == "text":
                parts.append({"type": "text", "text": block.text})
            elif kind == "image":
                parts.append({"type": "image_url", "image_url": {"url": f"data:{block.mime_type};base64,{block.data}"}})
            else:  # audio / tool_use / tool_result: we do not declare sampling.tools; describe
                parts.append({"type": "text", "text": f"[{kind} content omitted]"})
        if all(p["type"] == "text" for p in parts):
            messages.append({"role": m.role, "content": "\n".join(p["text"] for p in parts)})
        else:
            messages.append({"role": m.role, "content": parts})
    return messages


def _legacy_only(method, *args):
    """A call of an SDK method that warns it was removed in 2026-07-28: the hub calls it only
    on sessions of the handshake era, where it is not (the warning is given as the call
    makes its coroutine, so catching it here is synchronous)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (the SDK's MCPDeprecationWarning)
        return method(*args)


def _complete(client, p):
    import mcp_types as T
    ref = p.get("ref") or {}
    ref = (T.PromptReference if ref.get("type") == "ref/prompt" else
           T.ResourceTemplateReference).model_validate(ref)
    return client.complete(ref, p.get("argument") or {},
                           (p.get("context") or {}).get("arguments"))


# The requests a client of the MCP server face sends on to a server: method -> (client, params,
# progress callback, timeout) -> the SDK's awaitable. (resources/subscribe: to servers of the
# handshake era only; MCPHub.subscribe does it otherwise for 2026-07-28 ones.)
MCP_FORWARD = {
    "tools/call": lambda client, p, progress, timeout: client.call_tool(
        p["name"], p.get("arguments") or {}, read_timeout_seconds=timeout,
        progress_callback=progress),
    "resources/read": lambda client, p, progress, timeout: client.read_resource(p["uri"]),
    "prompts/get": lambda client, p, progress, timeout: client.get_prompt(
        p["name"], p.get("arguments") or None),
    "completion/complete": lambda client, p, progress, timeout: _complete(client, p),
    "resources/subscribe": lambda client, p, progress, timeout:
        _legacy_only(client.session.subscribe_resource, p["uri"]),
    "resources/unsubscribe": lambda client, p, progress, timeout:
        _legacy_only(client.session.unsubscribe_resource, p["uri"]),
}
# The same requests, from a 2026-07-28 client to a 2026-07-28 server, as a relay: the client's
# inputResponses and requestState go on, and an InputRequiredResult comes back to it (which the
# client answers and retries with), where MCP_FORWARD's Client methods would answer it with the
# hub's callbacks. `q` is the request's params as the SDK's model (validated before sending);
# its _meta holds only MCP_CALLER_CAPS, the client's capabilities (the server's questions are
# the client's to answer, so the server must know what the client can answer).
MCP_RELAY = {
    "tools/call": ("CallToolRequestParams", lambda client, q, progress, timeout:
                   client.session.call_tool(
                       q.name, q.arguments or {}, read_timeout_seconds=timeout,
                       progress_callback=progress, input_responses=q.input_responses,
                       request_state=q.request_state, meta=q.meta,
                       allow_input_required=True)),
    "resources/read": ("ReadResourceRequestParams", lambda client, q, progress, timeout:
                       client.session.read_resource(
                           str(q.uri), input_responses=q.input_responses,
                           request_state=q.request_state, meta=q.meta,
                           allow_input_required=True)),
    "prompts/get": ("GetPromptRequestParams", lambda client, q, progress, timeout:
                    client.session.get_prompt(
                        q.name, q.arguments or None, input_responses=q.input_responses,
                        request_state=q.request_state, meta=q.meta,
                        allow_input_required=True)),
}
# what MCPHub.listing lists: kind -> (Client method, the page's attribute, the capability)
MCP_LISTS = {"resources": ("list_resources", "resources", "resources"),
             "templates": ("list_resource_templates", "resource_templates", "resources"),
             "prompts": ("list_prompts", "prompts", "prompts")}


# a 2026 server's listen-stream events (the SDK's classes, by name) -> the notification each is
_LISTEN_EVENTS = {"ToolsListChanged": "notifications/tools/list_changed",
                  "PromptsListChanged": "notifications/prompts/list_changed",
                  "ResourcesListChanged": "notifications/resources/list_changed"}


def _listen_method(event):
    return _LISTEN_EVENTS.get(type(event).__name__)


def _elicit_defaults(schema):
    """Form content from the schema's defaults, or None when a required field has no default."""
    props = (schema or {}).get("properties") or {}
    content = {k: p["default"] for k, p in props.items() if isinstance(p, dict) and "default" in p}
    return content if all(k in content for k in (schema or {}).get("required") or []) else None


# ---- OAuth for HTTP servers -------------------------------------------------------------------
# The SDK's providers (mcp.client.auth) do the protocol: discovery (RFC 9728; RFC 8414 and OpenID
# Connect, with their fallbacks), the client's identity (pre-registered, a Client ID Metadata
# Document, or dynamic registration, RFC 7591), PKCE, `resource` (RFC 8707), the choice of scopes
# and step-up, the `iss` check (RFC 9207), refresh, and the client-credentials grant. What a
# gateway with workers needs of them besides is written here: tokens in one file that every
# worker and CLI run shares, refreshed under that file's lock (a refresh token may be good for one
# use only, so two workers must not both spend it); requests that do not queue behind the
# provider's lock while their token is good; a refresh, not a new login, when a server refuses a
# token before its stated expiry; and, where nobody can log in (serve), the refusal passed on
# with the command that logs in.

MCP_TOKENS_VERSION = 1


def tokens_path(registry):
    """Where the OAuth tokens of a registry's MCP servers are kept: beside the registry (beside
    the file a symlinked registry points at)."""
    return os.path.realpath(registry) + ".tokens"


class MCPTokenStore:
    """`<registry>.tokens`: the OAuth tokens and client registrations of HTTP MCP servers, as
    {"version": 1, "servers": {NAME: {SERVER_URL: {"tokens", "expires_at", "client", "issuer",
    "metadata", "resource_metadata", "auth_server"}}}}: keyed by server and resource (the URL
    the tokens were granted for, so an entry given another URL does not send them there), with
    what discovery found when they were granted (a refresh needs the token endpoint). Mode 0600,
    replaced atomically; changed under an exclusive lock on `<registry>.tokens.lock`
    (RegistryLock's), which a refresh holds from before it reads the refresh token until its
    answer is saved. Reading takes no lock. Raises RegistryError for a file it cannot use."""

    def __init__(self, path):
        self.path = path
        self._mutex = None  # asyncio.Lock: one task of this process holds the file lock
        self._holder = None  # that task (what it saves meanwhile does not lock again)

    def stamp(self):
        """What changes when the file is replaced (None: there is none)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def read(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return {"version": MCP_TOKENS_VERSION, "servers": {}}
        except (OSError, ValueError) as exc:
            raise RegistryError(f"cannot read {self.path}: {exc}") from None
        if not isinstance(doc, dict) or doc.get("version") != MCP_TOKENS_VERSION or \
                not isinstance(doc.get("servers"), dict):
            raise RegistryError(f"{self.path} is not a token file of this llmhost; move it "
                                "away and log in again")
        return doc

    def record(self, name, url):
        """One server's record ({} when there is none)."""
        return dict((self.read()["servers"].get(name) or {}).get(url) or {})

    def _write(self, doc):
        path = os.path.realpath(self.path)
        try:  # (owner-only: tokens)
            replace_file(path, json.dumps(doc, indent=2) + "\n", 0o600, ".servers.tokens.")
        except OSError as exc:
            raise RegistryError(f"cannot write {path}: {exc.strerror or exc}") from None

    def _change(self, change):
        doc = self.read()
        before = json.dumps(doc, sort_keys=True)
        result = change(doc["servers"])
        for name, records in list(doc["servers"].items()):
            for url in [u for u, rec in records.items() if not rec]:
                del records[url]
            if not records:
                del doc["servers"][name]
        if json.dumps(doc, sort_keys=True) != before:
            self._write(doc)
        return result

    def change(self, change):
        """Apply change(servers) under the lock, from outside the event loop (the CLI)."""
        with RegistryLock(self.path):
            return self._change(change)

    def hold(self):
        """The file lock, for this task, across awaits (`async with store.hold():`)."""
        return _TokensHeld(self)

    async def update(self, name, url, fields):
        """Set fields of one server's record (a value None removes the field)."""
        def change(servers):
            record = servers.setdefault(name, {}).setdefault(url, {})
            for key, value in fields.items():
                if value is None:
                    record.pop(key, None)
                else:
                    record[key] = value

        async with self.hold():
            self._change(change)


class _TokensHeld:
    """MCPTokenStore.hold(). The flock is taken in a thread: another process may hold it through
    a refresh's round trip, and the loop serves meanwhile. A task that holds it already (its
    refresh saves what it got) does not take it again."""

    def __init__(self, store):
        self.store, self.lock, self.nested = store, None, False

    async def __aenter__(self):
        import asyncio
        store = self.store
        if store._holder is not None and store._holder is asyncio.current_task():
            self.nested = True
            return self
        if store._mutex is None:
            store._mutex = asyncio.Lock()
        await store._mutex.acquire()
        try:
            lock = RegistryLock(store.path)
            taking = asyncio.get_running_loop().run_in_executor(None, lock.__enter__)
            try:
                await asyncio.shield(taking)
            except asyncio.CancelledError:
                def let_go(done):
                    # The thread still takes the lock: it is let go once it has.
                    done.cancelled() or done.exception()
                    lock.__exit__(None, None, None)
                taking.add_done_callback(let_go)
                raise
        except BaseException:
            store._mutex.release()
            raise
        self.lock, store._holder = lock, asyncio.current_task()
        return self

    async def __aexit__(self, *exc):
        if not self.nested:
            self.store._holder = None
            self.lock.__exit__(None, None, None)
            self.store._mutex.release()
        return False


# What a token's record keeps of discovery (see _TokenFile.found)
MCP_DISCOVERED = ("issuer", "metadata", "resource_metadata", "auth_server")


class _TokenFile:
    """The SDK's TokenStorage for one server: its record in an MCPTokenStore. A pre-registered
    client (--client-id) is given, never stored: its secret is read from the environment."""

    def __init__(self, store, name, url, client=None):
        self.store, self.name, self.url, self.client = store, name, url, client
        self.seen = None  # the file's stamp when this record was last read or written
        self.expires_at = None  # time.time() at which the tokens last read or written expire
        # What discovery found when they were granted: the authorization server's issuer and
        # metadata, the protected resource's metadata, and which server it named.
        self.found = dict.fromkeys(MCP_DISCOVERED)
        self.saved = None  # called after tokens are saved (the provider sets its clock)

    def changed(self):
        return self.store.stamp() != self.seen

    def _load(self):
        self.seen = self.store.stamp()
        record = self.store.record(self.name, self.url)
        self.expires_at = record.get("expires_at")
        self.found = {key: record.get(key) for key in MCP_DISCOVERED}
        return record

    async def get_tokens(self):
        from mcp.shared.auth import OAuthToken
        tokens = self._load().get("tokens")
        return OAuthToken.model_validate(tokens) if tokens else None

    async def set_tokens(self, tokens):
        self.expires_at = time.time() + tokens.expires_in if tokens.expires_in else None
        await self.store.update(self.name, self.url, dict(
            self.found, tokens=tokens.model_dump(mode="json", exclude_none=True),
            expires_at=self.expires_at))
        self.seen = self.store.stamp()
        if self.saved is not None:
            self.saved()

    async def forget_tokens(self):
        await self.store.update(self.name, self.url, {"tokens": None, "expires_at": None})
        self.seen = self.store.stamp()

    async def get_client_info(self):
        from mcp.shared.auth import OAuthClientInformationFull
        if self.client is not None:
            return self.client
        client = self.store.record(self.name, self.url).get("client")
        return OAuthClientInformationFull.model_validate(client) if client else None

    async def set_client_info(self, client_info):
        if self.client is None:
            await self.store.update(self.name, self.url, {
                "client": client_info.model_dump(mode="json", exclude_none=True)})
            self.seen = self.store.stamp()


def _key_algorithm(name, pem):
    """The JWS algorithm a PEM private key signs with (RFC 7518 §3.1)."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
    except ImportError:
        raise MCPError(name, "signing with a client key needs the cryptography package: pip "
                       "install cryptography") from None
    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise MCPError(name, f"the client key is no unencrypted PEM private key ({exc})") from None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in (
            "secp256r1", "secp384r1", "secp521r1"):
        return {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}[key.curve.name]
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    raise MCPError(name, "the client key is of a kind no JWS algorithm signs with here "
                   "(use EC P-256/384/521, RSA or Ed25519)")


def mcp_oauth_provider(c, url, oauth, store, login, secret=None, key=None):
    """An httpx2 auth for server `c` (an _MCPConn): the SDK's provider for its settings, with
    what llmhost adds (see the comment above MCPTokenStore). `login` is the browser step
    (LoopbackLogin in the CLI), None where nobody can log in; `secret` and `key` are the client
    secret and the PEM private key, read from the environment and the key file by the hub."""
    import warnings
    from urllib.parse import urlsplit

    from mcp.client.auth import OAuthClientProvider
    from mcp.client.auth.extensions.client_credentials import (
        ClientCredentialsOAuthProvider, PrivateKeyJWTOAuthProvider, SignedJWTParameters)
    from mcp.client.auth.utils import extract_field_from_www_auth, union_scopes
    from mcp.shared.auth import (OAuthClientInformationFull, OAuthClientMetadata, OAuthMetadata,
                                 ProtectedResourceMetadata)
    from mcp.shared.exceptions import MCPDeprecationWarning
    from mcp.shared.inbound import MCP_PROTOCOL_VERSION_HEADER
    from pydantic import AnyUrl

    def challenge(response):
        """What a response asks of the client's credentials: "login", "scope" or None."""
        if response.status_code == 401:
            return "login"
        if response.status_code == 403 and \
                extract_field_from_www_auth(response, "error") == "insufficient_scope":
            return "scope"
        return None

    class Shared:
        """Mixed into the SDK's provider; see mcp_oauth_provider."""

        def _join(self, tokens, fixed_client, scope, port, cimd=None):
            self._tokens, self._fixed_client = tokens, fixed_client
            self._scope, self._port, self._cimd = scope, port, cimd
            tokens.saved = self._clock

        def _clock(self):
            """The SDK's clock for the tokens of the file: their expiry, early (at most half
            their life), as the file says it; the SDK would take the whole life from now."""
            tokens, expires_at = self.context.current_tokens, self._tokens.expires_at
            if tokens is None or expires_at is None:
                self.context.token_expiry_time = None
                return
            self.context.token_expiry_time = expires_at - min(
                MCP_TOKEN_EARLY, (tokens.expires_in or 0) / 2)

        async def _initialize(self):
            await super()._initialize()
            self._rediscover()
            self._clock()

        def _rediscover(self):
            """What discovery found when the tokens were granted, where this process has not
            run it (the SDK discovers on a 401 only, and would refresh at the MCP server's
            origin)."""
            found, ctx = self._tokens.found, self.context
            if ctx.oauth_metadata is None and found.get("metadata"):
                ctx.oauth_metadata = OAuthMetadata.model_validate(found["metadata"])
            if ctx.protected_resource_metadata is None and found.get("resource_metadata"):
                ctx.protected_resource_metadata = ProtectedResourceMetadata.model_validate(
                    found["resource_metadata"])
            if ctx.auth_server_url is None and found.get("auth_server"):
                ctx.auth_server_url = found["auth_server"]

        async def _adopt(self, force=False):
            """Take what another process saved since this one read the file: a worker's
            refresh, a `mcp login` while serve runs."""
            if force or self._tokens.changed():
                self.context.current_tokens = await self._tokens.get_tokens()
                if not self._fixed_client:
                    self.context.client_info = await self._tokens.get_client_info()
                self._rediscover()
                self._clock()

        def _bearer(self, request):
            if self.context.is_token_valid():
                self._add_auth_header(request)
            return request.headers.get("Authorization")

        def _fit_auth_method(self):
            """A pre-registered secret goes the way the server takes it: client_secret_basic
            unless it lists only client_secret_post (RFC 8414 §2's default is basic)."""
            client, meta = self.context.client_info, self.context.oauth_metadata
            if client is None or client.token_endpoint_auth_method == "private_key_jwt" or \
                    client.client_id == self._cimd or not (self._fixed_client or client is
                                                            self._tokens.client):
                return
            methods = (meta.token_endpoint_auth_methods_supported if meta else None) or \
                ["client_secret_basic"]
            client.token_endpoint_auth_method = "none" if not client.client_secret else \
                "client_secret_post" if "client_secret_basic" not in methods and \
                "client_secret_post" in methods else "client_secret_basic"

        async def _refresh_token(self):
            self._fit_auth_method()
            return await super()._refresh_token()

        async def _perform_authorization(self):
            if self._scope:  # the scopes the entry asks for, beside those the server names
                self.context.client_metadata.scope = union_scopes(
                    self.context.client_metadata.scope, self._scope)
            self._fit_auth_method()
            return await super()._perform_authorization()

        async def _handle_token_response(self, response):
            ctx = self.context
            self._tokens.found = {
                "issuer": str(ctx.oauth_metadata.issuer) if ctx.oauth_metadata else None,
                "metadata": ctx.oauth_metadata and ctx.oauth_metadata.model_dump(
                    mode="json", exclude_none=True),
                "resource_metadata": ctx.protected_resource_metadata and
                ctx.protected_resource_metadata.model_dump(mode="json", exclude_none=True),
                "auth_server": ctx.auth_server_url}
            await super()._handle_token_response(response)

        async def _prepare_login(self):
            """The redirect URI of this login, on a port the browser can reach now."""
            client = self.context.client_info
            port, required = self._port, self._port is not None
            if port is None and client is not None and client.redirect_uris and \
                    not self._fixed_client and client is not self._tokens.client:
                port = urlsplit(str(client.redirect_uris[0])).port
            uri = await login.redirect_uri(port or 0, required, c.name)
            self.context.client_metadata.redirect_uris = [AnyUrl(uri)]
            if client is not None and client.client_id != self._cimd and \
                    client is not self._tokens.client and not self._fixed_client and \
                    [str(u) for u in client.redirect_uris or ()] != [uri]:
                # Registered for a redirect URI this login cannot use: register anew.
                self.context.client_info = None
            c.login_until = time.monotonic() + MCP_LOGIN_TIMEOUT

        async def _auth_flow(self, request):
            async with self.context.lock:
                if not self._initialized:
                    await self._initialize()
                else:
                    await self._adopt()
            version = request.headers.get(MCP_PROTOCOL_VERSION_HEADER)
            if version:  # (the SDK notes it in its own flow; a refresh made here needs it too)
                self.context.protocol_version = version
            response = sent = None
            # A good token (or none to refresh): the request goes at once, without the
            # provider's lock, which the SDK's flow holds until an answer's head arrives.
            if self.context.is_token_valid() or not self.context.can_refresh_token():
                sent = self._bearer(request)
                response = yield request
                if challenge(response) is None:
                    c.login_needed = None
                    return
            # Refresh when the token expired by our clock, or the server refused it before.
            if response is None or challenge(response) == "login" and \
                    self.context.can_refresh_token():
                async with self.context.lock:
                    async with self._tokens.store.hold():
                        await self._adopt(force=True)
                        held = self.context.current_tokens
                        spent = not self.context.is_token_valid() or held is not None and \
                            sent == f"Bearer {held.access_token}"
                        if spent and self.context.can_refresh_token():
                            answer = yield await self._refresh_token()
                            if not await self._handle_refresh_response(answer) and \
                                    answer.status_code in (400, 401):
                                await self._tokens.forget_tokens()  # (invalid_grant: gone)
                sent = self._bearer(request)
                response = yield request
                if challenge(response) is None:
                    c.login_needed = None
                    return
            if login is None and not self._machine:
                # Nobody here can log in: the refusal goes on to the transport as it is, and
                # the hub's message names the command that logs in.
                c.login_needed = challenge(response)
                return
            if login is not None and not self._machine:
                await self._prepare_login()
            # The SDK's flow (discovery, registration, the browser step, step-up), given the
            # answer this request already has rather than sending it again.
            flow = super()._auth_flow(request)
            try:
                outgoing = await flow.__anext__()
                while True:
                    if outgoing is request and response is not None and \
                            request.headers.get("Authorization") == sent:
                        incoming, response = response, None
                    else:
                        incoming = yield outgoing
                    if outgoing is request and challenge(incoming) is None:
                        c.login_needed = None
                    outgoing = await flow.asend(incoming)
            except StopAsyncIteration:
                return
            except Exception as exc:
                if self.context.protected_resource_metadata is None and \
                        self.context.oauth_metadata is None:
                    # Nothing says how to log in (nor did the 2025-03-26 default endpoints).
                    raise RuntimeError(
                        f"HTTP {c.http_status or 401}: the server wants credentials, e.g. "
                        "--header 'Authorization: Bearer TOKEN' (no OAuth login was found: "
                        f"{_describe_exc(exc)})") from None
                raise
            finally:
                c.login_until = 0.0
                await flow.aclose()

    def build(base, *args, **kwargs):
        provider = type(f"LLMHost{base.__name__}", (Shared, base), {"_machine": base is not
                                                                    OAuthClientProvider})
        with warnings.catch_warnings():
            # Without an issuer the SDK warns that the MCP server picks the authorization
            # server; the tokens file pins the one that first granted a token.
            warnings.simplefilter("ignore", MCPDeprecationWarning)
            return provider(*args, **kwargs)

    scope = oauth.get("scope")
    issuer = store.record(c.name, url).get("issuer")
    if oauth.get("client_credentials") and key is not None:
        algorithm = _key_algorithm(c.name, key)
        tokens = _TokenFile(store, c.name, url)
        # The assertion names the client as its issuer and subject (RFC 7523 §3).
        sign = SignedJWTParameters(issuer=oauth["client_id"], subject=oauth["client_id"],
                                   signing_key=key, signing_algorithm=algorithm)
        auth = build(PrivateKeyJWTOAuthProvider, url, tokens, oauth["client_id"],
                     sign.create_assertion_provider(), scope=scope, issuer=issuer)
        auth._join(tokens, True, scope, oauth.get("callback_port"))
        return auth
    if oauth.get("client_credentials"):
        tokens = _TokenFile(store, c.name, url)
        auth = build(ClientCredentialsOAuthProvider, url, tokens, oauth["client_id"], secret,
                     scope=scope, issuer=issuer)
        auth._join(tokens, True, scope, oauth.get("callback_port"))
        return auth
    fixed = None
    if oauth.get("client_id"):
        fixed = OAuthClientInformationFull(
            client_id=oauth["client_id"], client_secret=secret, issuer=issuer,
            redirect_uris=[AnyUrl("http://127.0.0.1/callback")],
            token_endpoint_auth_method="client_secret_basic" if secret else "none")
    tokens = _TokenFile(store, c.name, url, fixed)
    auth = build(OAuthClientProvider, url, OAuthClientMetadata(
        client_name="llmhost", redirect_uris=[AnyUrl("http://127.0.0.1/callback")],
        grant_types=["authorization_code", "refresh_token"], response_types=["code"]),
        tokens, login.open if login else None, login.callback if login else None,
        client_metadata_url=oauth.get("client_metadata_url"))
    auth._join(tokens, False, scope, oauth.get("callback_port"), oauth.get("client_metadata_url"))
    return auth


# A key of llmhost's in a request's _meta, put there by the hub and taken out again on the
# transport's write stream: the capabilities of the MCP client whose request it relays, which
# then replace the hub's own in io.modelcontextprotocol/clientCapabilities (the SDK stamps the
# Client's capabilities on every 2026-07-28 request, and has no per-request override).
MCP_CALLER_CAPS = "dev.llmhost/callerCapabilities"


def _results_complete_by_default(transport):
    """The transport's streams as the hub needs them. Read side, SEP-2322: a result without
    `resultType` is complete (the 2.3.0 SDK checks 2026-07-28 results against a schema that
    requires it, so each result that lacks it gets it here; results of earlier revisions pass
    their check with it too). Write side: a request carrying MCP_CALLER_CAPS goes with those
    capabilities instead of the hub's (a relay says what its client can do, not the hub)."""

    class Reader:
        def __init__(self, stream):
            self._stream = stream

        def __getattr__(self, name):  # (last_context, which the dispatcher reads after each)
            return getattr(self._stream, name)

        @staticmethod
        def _tag(item):
            result = getattr(getattr(item, "message", None), "result", None)
            if isinstance(result, dict) and "resultType" not in result:
                result["resultType"] = "complete"
            return item

        async def receive(self):
            return self._tag(await self._stream.receive())

        def __aiter__(self):
            return self

        async def __anext__(self):
            return self._tag(await self._stream.__anext__())

        async def aclose(self):
            await self._stream.aclose()

        async def __aenter__(self):
            await self._stream.__aenter__()
            return self

        async def __aexit__(self, *exc):
            return await self._stream.__aexit__(*exc)

    class Writer:
        def __init__(self, stream):
            self._stream = stream

        def __getattr__(self, name):
            return getattr(self._stream, name)

        async def send(self, item):
            params = getattr(getattr(item, "message", None), "params", None)
            meta = params.get("_meta") if isinstance(params, dict) else None
            if isinstance(meta, dict) and MCP_CALLER_CAPS in meta:
                caps = meta.pop(MCP_CALLER_CAPS)
                if MCP_META + "clientCapabilities" in meta:  # (2026-07-28 only)
                    meta[MCP_META + "clientCapabilities"] = caps
                if not meta:
                    del params["_meta"]
            await self._stream.send(item)

        async def __aenter__(self):
            await self._stream.__aenter__()
            return self

        async def __aexit__(self, *exc):
            return await self._stream.__aexit__(*exc)

    import contextlib

    @contextlib.asynccontextmanager
    async def tagged():
        async with transport as (read, write):
            yield Reader(read), Writer(write)

    return tagged()


# ---- the hub --------------------------------------------------------------------------------

def _streamable_http(url, headers, c, auth=None):
    """The v2 streamable HTTP transport has no headers=; it takes an httpx2 client we must close
    (with `auth`, the OAuth provider, if any). A 401 or 403 it gets is kept in `c.http_status`
    until a success: the SDK's error leaves it out."""
    import contextlib

    async def note(response):  # (only what says "credentials": calls run concurrently, so
        if response.status_code in (401, 403):  # another one's 405 or 404 must not replace it)
            c.http_status = response.status_code
        elif response.status_code < 400:
            c.http_status = None

    @contextlib.asynccontextmanager
    async def transport():
        import httpx2
        from mcp.client.streamable_http import streamable_http_client
        # the SDK's defaults (create_mcp_http_client): 30 s to connect, 300 s between reads
        async with httpx2.AsyncClient(headers=headers, event_hooks={"response": [note]},
                                      timeout=httpx2.Timeout(30.0, read=300.0), auth=auth) as http:
            async with streamable_http_client(url, http_client=http) as streams:
                yield streams

    return transport()


class MCPState:
    """An MCP connection's states; the strings are what /v1/mcp/servers and `mcp list` show.
    IDLE: no session (never started, or its session ended). CONNECTING: its owner task is
    entering the Client (spawn + handshake). READY: a session is up. FAILED: its last start
    failed; the next waits out a backoff. CLOSED: the hub shut down."""
    IDLE = "idle"
    CONNECTING = "connecting"
    READY = "ready"
    FAILED = "failed"
    CLOSED = "closed"


# The moves MCPHub makes, from each state, and what makes each; anything else is a bug (see
# _MCPConn.move). A failed start is marked twice: by its owner task as it ends, then by
# _ensure(), which knows whether it was the server's failure or its caller's leaving.
MCP_MOVES = {
    # -> CONNECTING: a call, a tool listing or warm() needs it. -> CLOSED: shutdown of one
    # never started, or whose session ended.
    MCPState.IDLE: frozenset((MCPState.CONNECTING, MCPState.CLOSED)),
    # -> READY: its Client is entered. -> FAILED: its owner task ended without a session (an
    # error, a timeout, a cancelled start). -> CLOSED: its owner task ended during shutdown.
    MCPState.CONNECTING: frozenset((MCPState.READY, MCPState.FAILED, MCPState.CLOSED)),
    # -> IDLE: its session ended (lost, or stopped by a registry edit); the next use restarts
    # it. -> CLOSED: its session ended during shutdown.
    MCPState.READY: frozenset((MCPState.IDLE, MCPState.CLOSED)),
    # -> CONNECTING: tried again once its backoff is over. -> FAILED: _ensure() marks the start
    # its owner task marked, with the reason. -> IDLE: _ensure() unmarks it (the start was
    # cancelled because its caller left). -> CLOSED: shutdown.
    MCPState.FAILED: frozenset((MCPState.CONNECTING, MCPState.FAILED, MCPState.IDLE,
                                MCPState.CLOSED)),
    # -> CLOSED: aclose() marks every one, some of which their owner task marked already.
    MCPState.CLOSED: frozenset((MCPState.CLOSED,)),
}


class _MCPConn(Stateful):
    """Per-server state. `client` is set only while the owner task holds an entered Client;
    `state` changes only through move()."""

    # A move outside the table is made all the same: the state only reports what the code
    # that moves it has already done (whether a session is usable is _alive()'s to say, from
    # the Client and its owner task), so a state kept against that code would report what is
    # not so.
    MOVES, KIND, TABLE = MCP_MOVES, "MCP", "MCP_MOVES"

    def log(self):
        return mcp_log()

    def __init__(self, name, spec):
        self.name, self.spec, self.transport = name, spec, mcp_transport(spec)
        self.client = self.owner = self.stop = self.lock = None
        self._state, self.era, self.server_info, self.last_error = MCPState.IDLE, None, None, None
        self.tools = None  # cached list[mcp Tool]; None = not listed yet or invalidated
        self.tools_until = 0.0  # when it goes stale (a 2026 server's ttlMs; legacy: never)
        self.http_status = None  # 401 or 403, when streamable HTTP's last answer was one
        self.login_needed = None  # "login" or "scope": its OAuth server wants what serve cannot do
        self.login_until = 0.0  # while a person logs in (browser), waits for it last until then
        self.login_command = None  # what logs in to it (said where a login is needed)
        self.failures, self.retry_at = 0, 0.0
        self.from_request = False  # named by a request's server_url: literal, never ${VAR}
        self.users = 0  # requests using it now (from_request only): it is not replaced meanwhile
        self.retired = False  # removed from the hub: must not be (re)started
        self.warming = None  # a background (re)connect while requests go on without it
        self.connecting_since = 0.0  # when its current start began (state "connecting")
        self.warming_since = 0.0  # when `warming` began
        self.calls = 0  # tool calls running now: a registry edit lets them finish first
        self.drained = None  # asyncio.Event set when a retired server's last call ends


    def why(self, exc):
        """_describe_exc, with the HTTP status the SDK leaves out of "Server returned an error
        response" (a 401 says more than that: the server wants a token)."""
        msg = _describe_exc(exc)
        if self.login_needed and "Server returned an error response" in msg:
            needs = "a login" if self.login_needed == "login" else "a login with more scopes"
            return f"needs {needs} (HTTP {self.http_status or 401}); run: {self.login_command}"
        if self.http_status and "Server returned an error response" in msg:
            msg += (f" (HTTP {self.http_status}: the server wants credentials, e.g. --header "
                    "'Authorization: Bearer TOKEN')")
        return msg

    def fresh_tools(self):
        """The cached tool list while it is fresh, else None (list again)."""
        if self.tools is not None and time.monotonic() >= self.tools_until:
            self.tools = None
        return self.tools

    def note_failure(self, error):
        self.last_error, self.failures = error, self.failures + 1
        # the first failure retries at once (a crash while idle), then 1, 2, 4 ... 30 s
        self.retry_at = time.monotonic() + (0 if self.failures <= 1 else min(MCP_BACKOFF_MAX, 2.0 ** (self.failures - 2)))


class MCPHub:
    """The MCP servers the app knows, connected by warm() (those attached to models) or on
    first use; see the banner for the contract."""

    def __init__(self, specs, *, environ, sampler=None, roots=(), call_timeout=MCP_CALL_TIMEOUT,
                 connect_timeout=MCP_CONNECT_TIMEOUT, tokens=None, login=None):
        self._conns = {name: _MCPConn(name, dict(spec)) for name, spec in specs.items()}
        self._environ, self._sampler, self._roots = environ, sampler, [os.path.abspath(r) for r in roots]
        self._call_timeout, self._connect_timeout = call_timeout, connect_timeout
        # OAuth: the token file (None: HTTP servers get no OAuth), and the browser step where a
        # person can take it (the CLI's LoopbackLogin; serve has none).
        self._tokens = MCPTokenStore(tokens) if tokens else None
        self._login = login
        self._closing = False
        # The MCP server face's hooks (None without one): notice(server, method, params) is told
        # a backend's notifications (list changes, resource updates, logs); asker(server,
        # method, params) -> a result dict, or None for the answer given without a client
        # (sampling by a model, elicitation declined), is asked a backend's sampling and
        # elicitation requests first.
        self.notice = self.asker = None
        self._adding = None  # asyncio.Lock: one add_from_request at a time (it awaits _retire)
        self._draining = {}  # retired servers finishing their calls -> the task that stops them
        # (server, uri) -> [subscribers, a future set once subscribed, the watching task or None]
        self._subscribed = {}

    # ---- connection lifecycle (owner task per server) ----

    def specs(self):
        """The registered servers (not those a request named by URL)."""
        return {name: c.spec for name, c in self._conns.items() if not c.from_request}

    async def add_from_request(self, name, spec):
        """A server a request names by an allowed server_url, held for that request until it
        gives the returned conn to release(). Kept (and reused) only by requests that give the
        same URL and headers; at most MCP_REQUEST_SERVERS are kept, and one in use is never
        replaced under its users."""
        import asyncio
        if self._adding is None:
            self._adding = asyncio.Lock()
        async with self._adding:  # the checks below must still hold after _retire's awaits
            return await self._add_from_request(name, spec)

    async def _add_from_request(self, name, spec):
        c = self._conns.get(name)
        if c is not None and c.spec == spec and c.from_request:
            c.users += 1
            return c
        if c is not None and c.users:
            raise BadRequest(f"MCP server_label {name!r} is in use by another request with "
                             "another server_url or headers; use another label.", status=409,
                             code="mcp_label_in_use", param="tools")
        if c is not None:
            await self._retire([c])
        dynamic = [c for c in self._conns.values() if c.from_request]
        if len(dynamic) >= MCP_REQUEST_SERVERS:
            idle = [c for c in dynamic if not c.users]
            if not idle:
                raise RateLimited(f"{len(dynamic)} MCP servers named by server_url are in "
                                  "use; retry shortly.", code="mcp_servers_busy",
                                  headers=[("Retry-After", "1")])
            await self._retire(idle[:1])  # the oldest not in use
        c = self._conns[name] = _MCPConn(name, dict(spec))
        c.from_request = True
        c.users = 1
        return c

    @staticmethod
    def release(conns):
        """The request that add_from_request() held these for is over."""
        for c in conns:
            c.users -= 1

    def _take_out(self, conns):
        """Remove these servers from the hub now, so new calls go to what replaces them; one
        with calls running is stopped when they end (up to its call timeout). -> the others,
        which the caller stops."""
        import asyncio
        for c in conns:
            c.retired = True
            if self._conns.get(c.name) is c:
                del self._conns[c.name]
            if c.calls:
                c.drained = asyncio.Event()
                self._draining[c] = asyncio.create_task(self._stop_when_drained(c))
        return [c for c in conns if not c.calls]

    async def _retire(self, conns):
        import asyncio
        await asyncio.gather(*(self._stop(c) for c in self._take_out(conns)),
                             return_exceptions=True)

    async def update(self, specs):
        """The registry changed: stop servers that went away or changed, know the new ones.
        New calls go to the new entry at once; calls running on an old one finish first (as
        requests to an edited upstream do), up to their call timeout, and then it stops."""
        import asyncio
        stale = [c for name, c in self._conns.items() if name in specs and c.from_request or
                 not c.from_request and specs.get(name) != c.spec]
        idle = self._take_out(stale)  # before any await
        for name, spec in specs.items():
            if name not in self._conns:
                self._conns[name] = _MCPConn(name, dict(spec))
        await asyncio.gather(*(self._stop(c) for c in idle), return_exceptions=True)

    async def _stop_when_drained(self, c):
        import asyncio
        try:
            await asyncio.wait_for(c.drained.wait(), c.spec.get("timeout") or self._call_timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self._draining.pop(c, None)
            await self._stop(c)

    def _conn(self, server):
        if server not in self._conns:
            raise MCPError(server, "not configured")
        return self._conns[server]

    def _target(self, c):
        """What `mcp.Client` connects to; ${VAR} expansion happens here, at connect time."""
        spec = c.spec
        environ = self._environ
        if c.from_request:  # a client's values are sent as they are: ${VAR} must never expand
            environ = {}    # to the gateway's own secrets
        try:
            if c.transport == "stdio":
                from mcp import StdioServerParameters
                from mcp.client.stdio import stdio_client
                env = {k: expand_env(v, environ) for k, v in (spec.get("env") or {}).items()}
                args = [expand_env(a, environ) for a in spec.get("args") or []]
                return _results_complete_by_default(stdio_client(StdioServerParameters(
                    command=spec["command"], args=args, env=env or None,
                    cwd=spec.get("cwd") or None)))
            headers = {k: v if c.from_request else expand_env(v, environ)
                       for k, v in (spec.get("headers") or {}).items()}
            auth = self._oauth(c, headers, environ)
        except KeyError as e:
            raise MCPError(c.name, f"environment variable {e.args[0]} is not set") from None
        if c.transport == "sse":
            from mcp.client.sse import sse_client
            return _results_complete_by_default(sse_client(spec["url"], headers=headers or None,
                                                           auth=auth))
        return _results_complete_by_default(_streamable_http(spec["url"], headers, c, auth))

    def _oauth(self, c, headers, environ):
        """The OAuth provider of an HTTP server, or None: for one a request named (its client
        sends its own headers), one given an Authorization header (static credentials), or a
        hub without a token file. KeyError(VAR) for a client secret's variable not set."""
        if c.from_request or self._tokens is None or \
                any(k.lower() == "authorization" for k in headers):
            return None
        import shlex
        oauth = c.spec.get("oauth") or {}
        registry = self._tokens.path[:-len(".tokens")]
        c.login_command = (f"python3 llmhost.py --registry {shlex.quote(registry)} mcp login "
                           f"{c.name}")
        secret = environ[oauth["client_secret_env"]] if "client_secret_env" in oauth else None
        key = None
        if "client_key" in oauth:
            try:
                with open(os.path.expanduser(oauth["client_key"]), encoding="utf-8") as f:
                    key = f.read()
            except (OSError, UnicodeDecodeError) as exc:
                raise MCPError(c.name, f"cannot read the client key {oauth['client_key']}: "
                               f"{getattr(exc, 'strerror', None) or exc}") from None
        return mcp_oauth_provider(c, c.spec["url"], oauth, self._tokens, self._login, secret, key)

    def _callbacks(self, c):
        import mcp_types as T
        name = c.name

        async def asked(method, params, result_type):
            """The answer of the MCP client whose call this is, if the face has one."""
            out = await self.asker(name, method, _dump(params)) if self.asker else None
            if out is None:
                return None
            if "error" in out:
                return T.ErrorData.model_validate(out["error"])
            return result_type.model_validate(out["result"])

        async def on_sampling(ctx, params):
            answer = await asked("sampling/createMessage", params, T.CreateMessageResult)
            if answer is not None:
                return answer
            if self._sampler is None:
                return T.ErrorData(code=T.INVALID_REQUEST, message="sampling is not available")
            request = {"messages": _sampling_to_openai(params), "max_tokens": params.max_tokens}
            if params.stop_sequences:
                request["stop"] = list(params.stop_sequences)
            if params.temperature is not None:
                request["temperature"] = params.temperature
            try:
                out = await self._sampler(name, request)
            except Exception as e:  # the app's model failed: tell the server, keep the session
                mcp_log().warning("MCP %s: sampling failed: %s", name, _describe_exc(e))
                return T.ErrorData(code=T.INTERNAL_ERROR, message=f"sampling failed: {_describe_exc(e)}")
            mcp_log().info("MCP %s: answered a sampling request (%s)", name, out.get("model"))
            return T.CreateMessageResult(role="assistant", content=T.TextContent(text=out.get("text") or ""),
                                         model=out.get("model") or "unknown",
                                         stop_reason=out.get("stop_reason") or "endTurn")

        async def on_elicit(ctx, params):
            answer = await asked("elicitation/create", params, T.ElicitResult)
            if answer is not None:
                return answer
            # No person is present: accept a form only when defaults answer every required field.
            content = None if getattr(params, "mode", "form") == "url" else _elicit_defaults(params.requested_schema)
            mcp_log().info("MCP %s: elicitation %s", name, "accepted with defaults" if content is not None else "declined")
            return T.ElicitResult(action="accept", content=content) if content is not None \
                else T.ElicitResult(action="decline")

        async def on_roots(ctx):
            from urllib.request import pathname2url
            return T.ListRootsResult(roots=[T.Root(uri="file://" + pathname2url(p),
                                                   name=os.path.basename(p) or p) for p in self._roots])

        async def on_log(params):
            level = {"debug": 10, "info": 20, "notice": 20, "warning": 30, "error": 40}.get(params.level, 50)
            mcp_log().log(level, "MCP %s%s: %s", name, f" [{params.logger}]" if params.logger else "", params.data)
            if self.notice is not None:
                self.notice(name, "notifications/message", _dump(params))

        # what the face tells its clients of (the GET stream, subscriptions/listen)
        passed = (T.ToolListChangedNotification, T.PromptListChangedNotification,
                  T.ResourceListChangedNotification, T.ResourceUpdatedNotification)

        async def on_message(msg):
            if isinstance(msg, T.ToolListChangedNotification):
                mcp_log().info("MCP %s: tool list changed", name)
                c.tools = None
            if isinstance(msg, passed) and self.notice is not None:
                self.notice(name, msg.method, _dump(msg.params) if msg.params else {})
            elif isinstance(msg, Exception):
                mcp_log().debug("MCP %s: transport: %s", name, _describe_exc(msg))

        kw = dict(elicitation_callback=on_elicit, logging_callback=on_log, message_handler=on_message,
                  log_level=MCP_LOG_LEVEL, cache=None,  # our own tool cache; the SDK's would go stale silently
                  client_info=T.Implementation(name="llmhost", version="1"))
        if self._sampler is not None:  # passing a callback is what declares the capability
            kw["sampling_callback"] = on_sampling
        if self._roots:
            kw["list_roots_callback"] = on_roots
        return kw

    async def _owner(self, c, ready):
        """Enter the Client, publish it, wait for stop, exit it - all in this one task."""
        import asyncio
        listener = None
        try:
            try:
                from mcp import Client
                from mcp_types.version import MODERN_PROTOCOL_VERSIONS
            except ImportError as e:
                raise MCPError(c.name, f"MCP needs the mcp package ({e}): pip install "
                               "'mcp>=2.3,<3'") from None
            async with Client(self._target(c), **self._callbacks(c)) as client:
                c.client, c.era, c.server_info = client, client.protocol_version, client.server_info
                c.move(MCPState.READY, f"connected ({client.protocol_version})")
                ready.set_result(client)
                caps = client.server_capabilities.tools
                if caps and caps.list_changed and client.protocol_version in MODERN_PROTOCOL_VERSIONS:
                    listener = asyncio.create_task(self._listen(c, client))
                await c.stop.wait()
        except BaseException as e:
            if not ready.done():
                ready.set_exception(e if isinstance(e, MCPError) else MCPError(c.name, c.why(e)))
            elif not isinstance(e, asyncio.CancelledError):
                mcp_log().warning("MCP %s: session ended: %s", c.name, _describe_exc(e))
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
        finally:
            if listener is not None:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)
            c.client = None
            if self._closing:
                c.move(MCPState.CLOSED, "its owner task ended at shutdown")
            elif c.state == MCPState.READY:
                c.move(MCPState.IDLE, "its session ended")
            else:
                c.move(MCPState.FAILED, "its owner task ended without a session")

    async def _listen(self, c, client):
        """2026-07-28 servers announce list changes only on a subscriptions/listen stream. It has
        no replay, so a lost stream means "assume changed": drop the cache and re-listen (with
        backoff) rather than restart the session under in-flight calls."""
        import asyncio
        delay = 1.0
        while True:
            try:
                async with client.listen(tools_list_changed=True, prompts_list_changed=True,
                                         resources_list_changed=True) as sub:
                    delay = 1.0
                    async for event in sub:
                        method = _listen_method(event)
                        if method == "notifications/tools/list_changed":
                            mcp_log().info("MCP %s: tool list changed", c.name)
                            c.tools = None
                        if method and self.notice is not None:
                            self.notice(c.name, method, {})
            except asyncio.CancelledError:
                raise
            except Exception as e:
                mcp_log().debug("MCP %s: listen stream ended: %s", c.name, _describe_exc(e))
            c.tools = None
            await asyncio.sleep(delay)
            delay = min(MCP_BACKOFF_MAX, delay * 2)

    def _alive(self, c):
        if c.client is None or c.owner is None or c.owner.done():
            return False
        if c.stop is not None and c.stop.is_set():
            return False  # lost, and its owner is exiting the Client: restart, do not reuse
        # A stdio child that exited closes the dispatcher (EOF); private attribute, read defensively.
        return not getattr(getattr(c.client.session, "_dispatcher", None), "_closed", False)

    async def _stop(self, c):
        import asyncio
        if c.owner is None:
            return
        c.stop.set()
        if c.client is None:  # still in its handshake, so not waiting for `stop`: no polite
            c.owner.cancel()  # close to wait for (it waited MCP_CLOSE_TIMEOUT for nothing)
        try:
            await asyncio.wait_for(asyncio.shield(c.owner), MCP_CLOSE_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            c.owner.cancel()  # cancelling the owner still exits the Client inside the owner task
            await asyncio.gather(c.owner, return_exceptions=True)
        except Exception:
            pass
        c.owner = c.client = None

    async def _ensure(self, server):
        """The connected Client for `server`, (re)starting it if needed; raises MCPError."""
        import asyncio
        c = self._conn(server)
        if self._closing:
            raise MCPError(server, "shutting down")
        if c.lock is None:
            c.lock = asyncio.Lock()
        failures = c.failures
        async with c.lock:
            if c.retired:
                raise MCPError(server, "removed from the registry")
            if self._closing:  # (asked again under the lock: a shutdown began while we waited
                raise MCPError(server, "shutting down")  # for it, and would not stop a start)
            if self._alive(c):
                return c.client
            if c.failures > failures:  # the start this one waited for has failed: so does this
                raise MCPError(server, f"could not start ({c.last_error})")  # one, not again
            if c.owner is not None:  # it died since last use: tear down, then restart
                mcp_log().warning("MCP %s: connection lost; restarting", server)
                await self._stop(c)
                c.tools = None
                c.note_failure("connection lost")
            wait = c.retry_at - time.monotonic()
            if wait > 0:
                raise MCPError(server, f"unavailable, next retry in {wait:.1f} s (last error: {c.last_error})")
            c.move(MCPState.CONNECTING, "starting a session")
            c.stop = asyncio.Event()
            ready = asyncio.get_running_loop().create_future()
            t0 = c.connecting_since = time.monotonic()
            c.owner = asyncio.create_task(self._owner(c, ready), name=f"mcp-owner-{server}")
            try:
                client = await self._patient(c, asyncio.shield(ready), self._connect_timeout)
            except BaseException as e:
                if not ready.done():
                    ready.cancel()  # nobody will read what the owner would have put there
                await self._stop(c)
                if self._closing:  # a shutdown cut the start: aclose() has said closed
                    if isinstance(e, asyncio.CancelledError):
                        raise
                    raise MCPError(server, "shutting down") from None
                # Its caller left (a client gone, a shutdown): no failure of the server's, and
                # a request that waited for this start tries its own.
                if isinstance(e, asyncio.CancelledError):
                    c.move(MCPState.IDLE, "its caller left while it started")
                    raise
                err = e if isinstance(e, MCPError) else MCPError(server, f"no answer within {self._connect_timeout:.0f} s"
                                                                 if isinstance(e, asyncio.TimeoutError) else _describe_exc(e))
                c.move(MCPState.FAILED, str(err))
                c.note_failure(str(err))
                raise err from None
            mcp_log().info("MCP %s: connected (%s, %s) in %.0f ms", server, c.transport, c.era,
                         (time.monotonic() - t0) * 1000)
            return client

    @staticmethod
    async def _patient(c, awaitable, timeout):
        """asyncio.wait_for(awaitable, timeout), but waiting on while a person logs in for `c`:
        the browser step of an OAuth login happens inside the connect or call it interrupts."""
        import asyncio
        task = asyncio.ensure_future(awaitable)
        deadline = time.monotonic() + timeout
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
                if done:
                    return task.result()
                if c.login_until <= deadline:
                    raise asyncio.TimeoutError
                deadline = c.login_until
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def _lost(self, c, exc):
        """Whether `exc` from a request means the session is gone (so the next use restarts).
        A server may answer with any error code, -32000 included (JSON-RPC leaves -32000 to
        -32099 to servers), and a malformed answer fails validation (a ValueError): the session
        lives on. Only the SDK's own "Connection closed" and transport failures mean it is gone."""
        from mcp.shared.exceptions import MCPError as SDKError
        if isinstance(exc, SDKError):
            lost = exc.code == -32000 and exc.message == "Connection closed" or \
                _session_refused(exc, c.transport) or not self._alive(c)
        else:
            lost = not isinstance(exc, ValueError) or not self._alive(c)
        if lost and c.stop is not None:
            c.stop.set()  # the owner exits the Client; _ensure restarts on next use
            c.last_error = _describe_exc(exc)
        return lost

    async def _walk(self, server, method, attr, pages=None):
        """Every page of a paginated list call (each page within the connect timeout); the
        pages themselves are added to `pages` if given."""
        import asyncio
        client = await self._ensure(server)
        items, cursor = [], None
        for _ in range(MCP_LIST_PAGES_MAX):
            page = await self._patient(self._conn(server), getattr(client, method)(cursor=cursor),
                                       self._connect_timeout)
            items += getattr(page, attr)
            if pages is not None:
                pages.append(page)
            cursor = page.next_cursor
            if not cursor:
                break
        return items

    @staticmethod
    def _tools_ttl(c, pages):
        """How long a tool list may be used: a 2026 server says it in each page's ttlMs (the
        SDK's servers say 0, "stale at once"); it is held at least MCP_TOOLS_TTL_MIN, so busy
        requests list it at most once a second. Such a server has no session whose loss would
        show it restarted with other tools; a legacy one has, and announces changes."""
        from mcp_types.version import MODERN_PROTOCOL_VERSIONS
        ttls = [page.ttl_ms for page in pages if "ttl_ms" in page.model_fields_set]
        if c.era not in MODERN_PROTOCOL_VERSIONS or not ttls:
            return float("inf")
        return max(MCP_TOOLS_TTL_MIN, min(ttls) / 1000)

    async def _tools_of(self, server):
        import asyncio
        c = self._conn(server)
        for attempt in (1, 2):  # a session found dead while listing: once more, restarted
            if c.fresh_tools() is not None:
                break
            try:
                pages = []
                tools = [t for t in await self._walk(server, "list_tools", "tools", pages)
                         if getattr(t.execution, "task_support", None) != "required"]
                c.tools_until = time.monotonic() + self._tools_ttl(c, pages)
                c.tools = tools
            except MCPError:  # (tools that can only run as MCP tasks are not offered: the
                raise  # SDK's call_tool does not run tasks)
            except Exception as e:
                if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
                    self._lost(c, e)  # a server that hangs is restarted on next use
                    raise MCPError(server, "listing tools timed out after "
                                           f"{self._connect_timeout:g}s") from None
                if not self._lost(c, e) or attempt == 2:
                    raise MCPError(server, f"listing tools failed: {c.why(e)}") \
                        from None
            else:
                c.failures = 0
        return c.tools

    def relist_due(self, servers):
        """Whether a connected one of these servers has had its tool list dropped since it was
        listed (tools/list_changed, or a new session)."""
        return any(c.tools is None and c.client is not None
                   for c in (self._conns.get(s) for s in servers) if c is not None)

    async def aclose(self):
        """Stop every server (stdio children exit: stdin closed, then TERM, then KILL)."""
        import asyncio
        self._closing = True
        for c in self._conns.values():
            if c.warming is not None:
                c.warming.cancel()
        for c in list(self._draining):
            c.drained.set()  # their calls are cut now: shutdown does not wait for them
        watching = [entry[2] for entry in self._subscribed.values() if entry[2] is not None]
        for task in watching:
            task.cancel()
        await asyncio.gather(*watching, return_exceptions=True)
        await asyncio.gather(*(self._stop(c) for c in self._conns.values()),
                             *self._draining.values(), return_exceptions=True)
        for c in self._conns.values():
            c.move(MCPState.CLOSED, "shutdown")

    # ---- what the application uses ----

    async def tools(self, server_names, allowed=None, optional=()):
        """OpenAI tool bindings for these servers, in order. `allowed` filters by MCP or OpenAI
        tool name: one iterable for all servers, or a mapping server -> iterable (absent = all);
        names are given before filtering, so a filter never changes them. Raises MCPError if a
        server cannot be reached, unless it is `optional` (then it is logged and left out)."""
        import asyncio

        async def listed(server):
            c = self._conn(server)
            if server not in optional or c.fresh_tools() is not None:
                return await self._tools_of(server)
            # An attached server is started (or listed) in a task of its own, which a request
            # waits for a while: one that failed before, not at all (it is tried anew aside),
            # and one still starting (a slow `npx -y`, a hung one, or one listing its tools)
            # until MCP_ATTACHED_WAIT after that began: requests that come later do not wait.
            if c.warming is None or c.warming.done():
                c.warming = asyncio.ensure_future(self._tools_of(server))
                c.warming.add_done_callback(lambda t: t.cancelled() or t.exception())
                c.warming_since = time.monotonic()
            task = c.warming
            if c.failures and not self._alive(c):
                raise MCPError(server, f"not connected (last error: {c.last_error}); "
                                       "reconnecting in the background")
            began = min(c.warming_since, c.connecting_since) if c.state == MCPState.CONNECTING \
                else c.warming_since  # (a start, or a listing that hangs once connected)
            wait = max(0.0, began + MCP_ATTACHED_WAIT - time.monotonic())
            try:
                return await asyncio.wait_for(asyncio.shield(task), wait)
            except asyncio.TimeoutError:
                raise MCPError(server, f"not ready within {MCP_ATTACHED_WAIT:g} s of its start; "
                                       "that goes on in the background") from None
            except asyncio.CancelledError:
                if task.cancelled():  # (its start was stopped: a shutdown), not this request
                    raise MCPError(server, "its start was stopped") from None
                raise

        lists = await asyncio.gather(*(listed(s) for s in server_names), return_exceptions=True)
        taken, out = set(), []
        for server, tools in zip(server_names, lists):
            if isinstance(tools, BaseException):
                if not (isinstance(tools, MCPError) and server in optional):
                    raise tools
                mcp_log().warning("MCP server %s left out of this request: %s", server,
                                  tools.message)
                continue
            allow = allowed.get(server) if isinstance(allowed, dict) else allowed
            allow = None if allow is None else set(allow)
            for t in tools:
                name = mcp_tool_name(server, t.name, taken)
                if allow is not None and t.name not in allow and name not in allow:
                    continue
                params = t.input_schema or {"type": "object", "properties": {}}
                out.append({"name": name, "server": server, "tool": t.name, "openai": {
                    "type": "function",
                    "function": {"name": name, "description": t.description or t.title or t.name, "parameters": params}}})
        return out

    async def warm(self, server_names):
        """Connect these servers and list their tools in the background, as LM Studio and
        Claude Desktop start theirs with the app, so the first request that uses them does not
        wait for them; one that fails is not waited for either (it is retried aside). The SDK
        (a second of imports) is loaded in a thread, so requests are served meanwhile."""
        import asyncio
        names = [n for n in server_names if n in self._conns and self._conns[n].tools is None
                 and not self._conns[n].failures]
        if not names:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, __import__, "mcp")
        except ImportError:
            return  # (a request that needs it says how to install it)
        except Exception as e:  # a broken install: said once here, and by each request
            mcp_log().warning("MCP servers not started: importing mcp failed: %s",
                              _describe_exc(e))
            return
        for server, result in zip(names, await asyncio.gather(
                *(self._tools_of(n) for n in names), return_exceptions=True)):
            c = self._conns.get(server)
            if c is None or c.retired or isinstance(result, asyncio.CancelledError) or \
                    not isinstance(result, BaseException):
                continue  # (a reload removed or replaced it meanwhile: nothing to say)
            mcp_log().warning("%s (retried when a request needs it, which does not wait for it)",
                              result.message if isinstance(result, MCPError) else
                              f"MCP server {server!r}: {_describe_exc(result)}")

    async def call(self, server, tool, arguments, timeout=None):
        """Run one tool. Returns {ok, content, text, parts, duration_ms, error}; raises MCPError
        only when the server cannot be started or reached."""
        c = self._conn(server)
        return await self._counted(c, self._call(c, server, tool, arguments, timeout))

    @staticmethod
    async def _counted(c, coro):
        """Await a call on `c`, counted in c.calls (a registry edit lets it finish first)."""
        c.calls += 1
        try:
            return await coro
        finally:
            c.calls -= 1
            if not c.calls and c.drained is not None:
                c.drained.set()

    async def _send(self, c, server, request, timeout):
        """`request(client)` (one request's awaitable) on the server's session, within `timeout`;
        sent once more, on a new session, if an HTTP server refused ours (it restarted and
        forgot it: the request was refused, not run). MCPError if it cannot be reached."""
        client = await self._ensure(server)
        try:
            return await self._patient(c, request(client), timeout)
        except Exception as e:
            if not _session_refused(e, c.transport):
                raise
            if c.client is client:  # (another call may have renewed it already)
                self._lost(c, e)
        client = await self._ensure(server)
        return await self._patient(c, request(client), timeout)

    async def forward(self, server, method, params, progress=None, relay=None):
        """A request of the MCP server face's client (a method of MCP_FORWARD), sent on to
        `server` within its call timeout -> the result as MCP JSON. `progress(done, total,
        message)`: a tool call's progress. `relay`: the capabilities of a client that speaks
        2026-07-28 (None for one that does not): when the server speaks it too, the request
        goes as MCP_RELAY sends it, with those capabilities (its InputRequiredResult is the
        client's to answer). Raises MCPError (cannot be reached), MCPRemoteError (the
        server's JSON-RPC error, a timeout, a lost connection, params the SDK refuses)."""
        import asyncio
        c = self._conn(server)
        timeout = c.spec.get("timeout") or self._call_timeout
        send = MCP_FORWARD[method]
        if relay is not None and method in MCP_RELAY:
            from mcp_types.version import MODERN_PROTOCOL_VERSIONS
            await self._ensure(server)
            if c.era in MODERN_PROTOCOL_VERSIONS:
                send = self._relay(method, dict(params, _meta={MCP_CALLER_CAPS: relay}))
        try:
            return _dump(await self._counted(c, self._send(
                c, server, lambda client: send(client, params, progress, timeout), timeout)))
        except (asyncio.TimeoutError, TimeoutError):
            raise MCPRemoteError(MCP_TIMEOUT_CODE, f"{server}: {method} timed out after "
                                                   f"{timeout:g} s") from None
        except (MCPError, asyncio.CancelledError):
            raise
        except Exception as e:
            raise self._remote_error(c, e) from None

    @staticmethod
    def _relay(method, params):
        """MCP_RELAY's sender of `method` with `params` checked against the SDK's model first
        (a malformed inputResponses is the client's error, not a lost session)."""
        import mcp_types
        from pydantic import ValidationError
        model, send = MCP_RELAY[method]
        try:
            q = getattr(mcp_types, model).model_validate(params)
        except ValidationError as e:
            raise MCPRemoteError(MCP_PARAMS_CODE, f"Invalid params: {e.errors()[0]['msg']}",
                                 {"errors": len(e.errors())}) from None
        return lambda client, p, progress, timeout: send(client, q, progress, timeout)

    def _remote_error(self, c, exc):
        """An SDK failure of a forwarded request as the JSON-RPC error the face answers."""
        error = getattr(exc, "error", None)
        code = getattr(error, "code", None)
        if code == MCP_TIMEOUT_CODE:
            return MCPRemoteError(code, f"{c.name}: {error.message}")
        lost = self._lost(c, exc)
        if isinstance(code, int) and not lost:
            return MCPRemoteError(code, error.message, getattr(error, "data", None))
        return MCPRemoteError(MCP_INTERNAL_CODE, f"MCP server {c.name!r}: " +
                              ("connection lost: " if lost else "") + c.why(exc))

    async def subscribe(self, server, uri):
        """One more subscriber to updates of resource `uri` of `server` (the face counts one a
        session or listen stream). The first subscribes: resources/subscribe to a server of
        the handshake era; to a 2026-07-28 one, which removed that method, a subscriptions/
        listen stream of that URI, kept (and opened again if lost) until the last subscriber
        leaves. Updates reach notice() as notifications/resources/updated either way. Raises
        MCPError or MCPRemoteError as forward() does: the server refused."""
        import asyncio
        entry = self._subscribed.get((server, uri))
        if entry is not None:
            entry[0] += 1
            try:
                return await asyncio.shield(entry[1])
            except BaseException:
                entry[0] -= 1
                raise
        entry = self._subscribed[(server, uri)] = [
            1, asyncio.get_running_loop().create_future(), None]
        try:
            from mcp_types.version import MODERN_PROTOCOL_VERSIONS
            c = self._conn(server)
            await self._ensure(server)
            if c.era in MODERN_PROTOCOL_VERSIONS:
                acked = asyncio.get_running_loop().create_future()
                entry[2] = asyncio.create_task(self._watch(server, uri, acked),
                                               name=f"mcp-watch-{server}")
                await asyncio.shield(acked)
            else:
                await self.forward(server, "resources/subscribe", {"uri": uri})
        except BaseException as e:
            if self._subscribed.get((server, uri)) is entry:
                del self._subscribed[(server, uri)]
            if entry[2] is not None:
                entry[2].cancel()
            if not entry[1].done():
                entry[1].set_exception(e if isinstance(e, Exception) else MCPError(
                    server, "the subscription was cut short"))
                entry[1].exception()  # (retrieved: a lone subscriber raises it below)
            raise
        entry[1].set_result(None)

    async def unsubscribe(self, server, uri):
        """One subscriber fewer (see subscribe); the last one ends the subscription."""
        import asyncio
        entry = self._subscribed.get((server, uri))
        if entry is None or not entry[1].done():
            return  # (never subscribed, or still subscribing: its failure says so)
        entry[0] -= 1
        if entry[0] > 0:
            return
        del self._subscribed[(server, uri)]
        if entry[2] is not None:
            entry[2].cancel()
            await asyncio.gather(entry[2], return_exceptions=True)
        elif server in self._conns and self._alive(self._conns[server]):
            await self.forward(server, "resources/unsubscribe", {"uri": uri})

    async def _watch(self, server, uri, acked):
        """A 2026-07-28 server's updates of `uri`, on a listen stream of that URI alone; one
        that is lost (a restart) is listened to again, with backoff, as _listen does. The
        first acknowledgement (or refusal) settles `acked`."""
        import asyncio
        delay = 1.0
        while True:
            try:
                client = await self._ensure(server)
                async with client.listen(resource_subscriptions=[uri]) as sub:
                    if not acked.done():
                        acked.set_result(None)
                    delay = 1.0
                    async for event in sub:
                        if type(event).__name__ == "ResourceUpdated" and self.notice:
                            self.notice(server, "notifications/resources/updated",
                                        {"uri": event.uri})
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not acked.done():
                    acked.set_exception(e if isinstance(e, MCPError) else
                                        self._remote_error(self._conn(server), e))
                    return
                if self._closing or server not in self._conns:
                    return
                mcp_log().debug("MCP %s: listen stream of %s ended: %s", server, uri,
                                _describe_exc(e))
            await asyncio.sleep(delay)
            delay = min(MCP_BACKOFF_MAX, delay * 2)

    async def page(self, server, kind, cursor=None):
        """One page of what `server` lists of `kind` (resources or templates: see MCP_LISTS),
        from `cursor` (None: the first) -> (MCP JSON dicts, the server's next cursor or
        None); ([], None) when it lacks the capability. Raises as listing() does."""
        async def one(client, method, attr):
            result = await self._patient(self._conn(server), getattr(client, method)(
                cursor=cursor), self._connect_timeout)
            return [_dump(x) for x in getattr(result, attr)], result.next_cursor or None
        return await self._list_call(server, kind, one, ([], None))

    async def listing(self, server, kind):
        """Everything `server` lists of `kind` (tools, resources, resource templates, prompts;
        see MCP_LISTS) as MCP JSON dicts; [] when it lacks the capability. Tools come from
        the tool cache. Raises MCPError or MCPRemoteError as forward() does."""
        if kind == "tools":
            return [_dump(t) for t in await self._tools_of(server)]

        async def every(client, method, attr):
            return [_dump(x) for x in await self._walk(server, method, attr)]
        return await self._list_call(server, kind, every, [])

    async def _list_call(self, server, kind, fetch, empty):
        """`fetch(client, method, attr)` of a list of `kind` (see MCP_LISTS) at `server`, or
        `empty` when it lacks the capability; errors as MCPError or MCPRemoteError."""
        import asyncio
        c = self._conn(server)
        method, attr, capability = MCP_LISTS[kind]
        try:
            client = await self._ensure(server)
            if not getattr(client.server_capabilities, capability):
                return empty
            return await fetch(client, method, attr)
        except (asyncio.TimeoutError, TimeoutError):
            raise MCPRemoteError(MCP_TIMEOUT_CODE, f"{server}: listing {kind} timed out") \
                from None
        except (MCPError, asyncio.CancelledError):
            raise
        except Exception as e:
            raise self._remote_error(c, e) from None

    async def _call(self, c, server, tool, arguments, timeout):
        import asyncio
        timeout = timeout or c.spec.get("timeout") or self._call_timeout
        t0 = time.monotonic()

        async def progress(done, total, message):
            mcp_log().info("MCP %s/%s: progress %s/%s %s", server, tool, done, total if total is not None else "?",
                         message or "")

        def result(ok, text, parts=None, error=None):
            parts = parts or [{"type": "text", "text": text}]
            return {"ok": ok, "content": parts if len(parts) > 1 else text, "text": text, "parts": parts,
                    "duration_ms": round((time.monotonic() - t0) * 1000, 1), "error": error}

        try:
            r = await self._send(c, server, lambda client: client.call_tool(
                tool, arguments or {}, read_timeout_seconds=timeout,
                progress_callback=progress), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            return result(False, f"Error: tool {tool} timed out after {timeout:g} s", error="timeout")
        except (asyncio.CancelledError, MCPError):
            raise  # the client went away: the SDK sends notifications/cancelled as this unwinds
        except Exception as e:
            if getattr(e, "code", None) == -32001:  # the SDK's own REQUEST_TIMEOUT
                return result(False, f"Error: tool {tool} timed out after {timeout:g} s", error="timeout")
            msg = ("connection lost: " if self._lost(c, e) else "") + c.why(e)
            return result(False, f"Error: {msg}", error=msg)
        c.failures = 0
        text, parts = mcp_result_to_openai(r)
        text = _cut_result(text)
        parts = [dict(p, text=_cut_result(p["text"])) if p.get("type") == "text" else p
                 for p in parts]
        if r.is_error:
            out = result(False, text or "Error: the tool reported an error", parts,
                         error=text or "tool error")
        else:
            out = result(True, text, parts)
        out["structured"] = r.structured_content  # (for `mcp call --json`)
        return out

    async def describe_tools(self, server):
        """The server's tools as MCP JSON, each with the name models see (`openai_name`)."""
        bindings = await self.tools([server])
        return [dict(_dump(t), openai_name=b["name"])
                for t, b in zip(self._conn(server).tools, bindings)]

    async def resources(self, server):
        """{'resources': [...], 'templates': [...]} as MCP JSON dicts."""
        return {"resources": await self.listing(server, "resources"),
                "templates": await self.listing(server, "templates")}

    async def prompts(self, server):
        return await self.listing(server, "prompts")

    async def read(self, server, uri):
        """resources/read: the ReadResourceResult as MCP JSON."""
        return await self._ask(server, f"reading {uri}", lambda client: client.read_resource(uri))

    async def prompt(self, server, name, arguments):
        """prompts/get: the GetPromptResult as MCP JSON."""
        return await self._ask(server, f"getting prompt {name!r}",
                               lambda client: client.get_prompt(name, arguments or None))

    async def _ask(self, server, what, request):
        """One request of the CLI's (read, prompt), within the call timeout; raises MCPError."""
        import asyncio
        c = self._conn(server)
        client = await self._ensure(server)
        try:
            return _dump(await self._patient(c, request(client), self._call_timeout))
        except (asyncio.TimeoutError, TimeoutError):
            raise MCPError(server, f"{what} timed out after {self._call_timeout:g} s") from None
        except MCPError:
            raise
        except Exception as e:
            self._lost(c, e)
            raise MCPError(server, f"{what} failed: {c.why(e)}") from None

    def status(self):
        """One dict per server for GET /v1/mcp/servers and `mcp list`. `login` names the
        command that logs in to a server whose OAuth needs a person (never a token)."""
        return [{"name": c.name, "transport": c.transport, "state": c.state, "era": c.era,
                 "server": _dump(c.server_info) if c.server_info else None,
                 "tools": None if c.tools is None else len(c.tools), "last_error": c.last_error,
                 "login": c.login_command if c.login_needed else None}
                for c in self._conns.values()]


async def no_model_to_sample(server, request):
    """The CLI's sampler. The CLI declares sampling as serve does, so a server offers it the
    same tools it offers models (some list their sampling tools only to clients that can)."""
    raise RuntimeError("the CLI has no model to answer sampling; under `serve` the "
                       "model of the chat request answers it")


async def with_mcp_server(name, entry, environ, action, tokens=None, login=None):
    """Connect to one server (registered or not yet), run `action(hub)`, shut it down. `tokens`
    and `login`: the token file and the browser step (see MCPHub)."""
    errors = validate_mcp_entry(name, entry)
    if errors:
        raise MCPError(name, "; ".join(errors))
    hub = MCPHub({name: entry}, environ=environ, sampler=no_model_to_sample, tokens=tokens,
                 login=login)
    try:
        return await action(hub)
    finally:
        await hub.aclose()


# =============================================================================
# MCP server
# =============================================================================
# Owns: llmhost as an MCP server (issue 19): /mcp, every exposed registered MCP server at once
#   (tools and prompts named <server>__<name> as models see them, resource URIs kept and routed
#   to their server), and /mcp/NAME, one server unprefixed; over streamable HTTP at both
#   revisions clients use - 2025-11-25 (initialize, Mcp-Session-Id, the GET stream, DELETE) and
#   2026-07-28 (stateless: each request's _meta says who asks; server/discover,
#   subscriptions/listen) - and over stdio (`mcp serve --stdio`). One MCPFront answers every
#   transport: JSON-RPC message in, JSON-RPC message out, notifications through `emit`.
#   Backends are reached through the MCPHub's sessions: its tool cache, restarts and timeouts.
# Raises: HTTPError for what HTTP refuses before any JSON-RPC (a server not exposed, an unknown
#   session, a body that is no JSON-RPC); a request's failure is its JSON-RPC error, never an
#   exception.
# Never: hosts the SDK's server (starlette/ASGI); imports `mcp` (the hub does, when a backend
#   is used); sends one client's log lines or sampling prompts to another client.

MCP_HANDSHAKE_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
MCP_MODERN_VERSION = "2026-07-28"
MCP_SESSIONS_MAX = 10000  # sessions held per process; the least recently used idle one goes
MCP_ENDED_MAX = 10000  # ids ended by DELETE remembered (a 404 for them, as the spec asks)
MCP_STREAM_PING = 15.0  # s between comments on an idle stream (the SDK's figure), for proxies
MCP_STREAM_BUFFER = 1 << 20  # bytes a stream's client may leave unread before it is dropped
MCP_ASK_TIMEOUT = 300.0  # s a client has to answer a sampling/elicitation request
# what a result of 2026-07-28 has that one of the handshake era has not
MCP_MODERN_RESULT_KEYS = ("resultType", "ttlMs", "cacheScope")
# JSON-RPC errors of ours, and the HTTP status a 2026-07-28 answer gives each (the SDK's table)
RPC_PARSE, RPC_INVALID, RPC_NO_METHOD, RPC_PARAMS = -32700, -32600, -32601, MCP_PARAMS_CODE
RPC_NOT_FOUND, RPC_VERSION, RPC_CANCELLED = -32002, -32022, -32800
RPC_HEADER_MISMATCH, RPC_CAPABILITY = -32020, -32021
RPC_HTTP_STATUS = {RPC_PARSE: 400, RPC_INVALID: 400, RPC_PARAMS: 400, RPC_VERSION: 400,
                   RPC_HEADER_MISMATCH: 400, RPC_CAPABILITY: 400, RPC_NO_METHOD: 404}
# methods 2026-07-28 removed (the handshake, and what lived on a session): "method not found"
MCP_REMOVED = frozenset({"initialize", "ping", "logging/setLevel", "resources/subscribe",
                         "resources/unsubscribe"})
# the methods whose request names something, and the param that names it: the Mcp-Name header
# repeats it (SEP-2243)
MCP_NAMED = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
# methods that reach a backend: each takes an admission slot, as any request does
MCP_ADMITTED = frozenset({"tools/list", "tools/call", "resources/list", "resources/read",
                          "resources/templates/list", "prompts/list", "prompts/get",
                          "completion/complete", "resources/subscribe",
                          "resources/unsubscribe"})
# the results that say how long a 2026-07-28 client may cache them (ttlMs, cacheScope)
MCP_CACHEABLE = frozenset({"server/discover", "tools/list", "resources/list",
                           "resources/templates/list", "prompts/list", "resources/read"})
# what a 2026-07-28 client retries a request with, answering an InputRequiredResult (SEP-2322)
MCP_INPUT_KEYS = ("inputResponses", "requestState")
MCP_LIST_CHANGED = {"notifications/tools/list_changed": "toolsListChanged",
                    "notifications/prompts/list_changed": "promptsListChanged",
                    "notifications/resources/list_changed": "resourcesListChanged"}
MCP_SSE = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
           ("X-Accel-Buffering", "no")]


class RPCError(Exception):
    """A request's JSON-RPC error, raised inside MCPFront and answered as such."""

    def __init__(self, code, message, data=None):
        super().__init__(message)
        self.rpc = {"code": code, "message": message}
        if data is not None:
            self.rpc["data"] = data


def rpc_event(msg):
    """One JSON-RPC message as an SSE event (streamable HTTP's framing)."""
    return b"event: message\ndata: " + json_bytes(msg) + b"\n\n"


def rpc_error(rid, code, message, data=None):
    error = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": rid, "error": error}


def mcp_header_value(value):
    """An Mcp-Name header's value as the body has it: as sent, or the text of a
    `=?base64?...?=` sentinel (how a client sends what a header cannot carry); None for a
    sentinel that is not canonical base64 of UTF-8, which then matches nothing."""
    import base64
    import binascii
    found = re.fullmatch(r"=\?base64\?(.*)\?=", value or "")
    if found is None:
        return value
    try:
        raw = base64.b64decode(found[1], validate=True)
        return raw.decode() if base64.b64encode(raw).decode() == found[1] else None
    except (binascii.Error, UnicodeDecodeError):
        return None


def mcp_modern_refusal(msg, meta, headers=None):
    """The error a 2026-07-28 request earns before it is run, or None, the SDK's ladder
    (first failure wins): _meta must carry the version and the capabilities; over HTTP
    (`headers` given) MCP-Protocol-Version, Mcp-Method and, for the methods that name
    something, Mcp-Name must repeat the body (SEP-2243: routing intermediaries read them);
    the version must be ours; the method must be one of the revision's."""
    rid, method = msg.get("id"), msg.get("method")
    stamped = meta.get(MCP_META + "protocolVersion")
    for key in ("protocolVersion", "clientCapabilities"):
        full = MCP_META + key
        if full not in meta or key == "clientCapabilities" and not isinstance(meta[full], dict):
            return rpc_error(rid, RPC_PARAMS, f"Invalid params: _meta.{MCP_META}{key} is "
                             "required")
    if headers is not None:
        params = msg.get("params") if isinstance(msg.get("params"), dict) else {}
        named = params.get(MCP_NAMED.get(method)) if method in MCP_NAMED else None
        for header, body, differ in (
                ("MCP-Protocol-Version", stamped, headers.get("mcp-protocol-version") != stamped),
                ("Mcp-Method", method, headers.get("mcp-method") != method),
                ("Mcp-Name", named, named is not None and
                 mcp_header_value(headers.get("mcp-name")) != named)):
            if differ:
                return rpc_error(rid, RPC_HEADER_MISMATCH, f"{header} header does not match "
                                 "the request body", {"header": header, "body": body})
    if not isinstance(stamped, str):
        return rpc_error(rid, RPC_PARAMS, "Invalid params: the protocol version must be a "
                         "string")
    if stamped != MCP_MODERN_VERSION:
        return rpc_error(rid, RPC_VERSION, "Unsupported protocol version", {
            "supported": [MCP_MODERN_VERSION], "requested": stamped})
    if method in MCP_REMOVED:
        return rpc_error(rid, RPC_NO_METHOD, f"Method not found: {method} is not of "
                         f"{MCP_MODERN_VERSION}")
    return None


class MCPFace:
    """What HTTP refusals of /mcp routes look like (401, 403, 404...): a JSON-RPC error, as an
    MCP client reads them (the Application's faces are duck-typed on these two methods)."""

    def error_body(self, exc):
        return json_bytes(rpc_error(None, RPC_INVALID if exc.status < 500 else
                                    MCP_INTERNAL_CODE, exc.message))

    def error_event(self, exc):
        return rpc_event(rpc_error(None, MCP_INTERNAL_CODE, exc.message))


MCP_FACE = MCPFace()


def mcp_session_sign(secret, payload):
    import hashlib
    import hmac
    return hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()[:32]


def mcp_template_matches(template, uri):
    """Whether `uri` is one a resource template (RFC 6570, simple expansions) makes."""
    parts = re.split(r"\{[^}]*\}", template)
    pattern = "[^?#]*?".join(re.escape(p) for p in parts)
    return re.fullmatch(pattern, uri) is not None


class MCPSession:
    """A 2025-11-25 client's session. Its id carries what the session needs (the version and
    the capabilities that matter, signed), so any process of serve --workers takes it; what
    lives here only - streams, calls under way, subscriptions - is this process's."""

    def __init__(self, sid, view, version, caps, client):
        self.id, self.view, self.version, self.caps, self.client = sid, view, version, caps, client
        self.started = self.used = time.time()
        self.requests = 0
        self.calls = {}  # JSON-RPC id -> the task answering it (notifications/cancelled)
        self.subscriptions = set()  # (server, uri) of resources/subscribe
        self.outlets = set()  # its GET streams

    def info(self):
        return {"id": self.id[:12] + "...", "view": self.view or "*", "version": self.version,
                "client": self.client, "requests": self.requests,
                "calls": len(self.calls), "streams": len(self.outlets),
                "started": round(self.started), "idle_seconds": round(time.time() - self.used)}


class MCPExchange:
    """One request being answered: who asks (`session`, or None at 2026-07-28), on which view
    (a server's name, None for all), and `emit(msg)`, which sends a message before the answer
    (progress, logs, a request to the client), or None where nothing can go."""

    def __init__(self, view, session, rid, params, emit, modern):
        self.view, self.session, self.rid, self.emit, self.modern = view, session, rid, emit, modern
        self.params = params
        meta = params.get("_meta") if isinstance(params.get("_meta"), dict) else {}
        self.progress_token = meta.get("progressToken")
        self.caps = session.caps if session is not None else \
            meta.get(MCP_META + "clientCapabilities") or {}
        self.log_level = meta.get(MCP_META + "logLevel") if modern else "legacy"
        self.server = None  # the backend it is waiting for (logs and asks find it so)
        self.method = None


class MCPOutlet:
    """A stream the client holds open for notifications: a GET stream (2025-11-25, every
    list change of its view and the resources its session subscribed to) or a
    subscriptions/listen response (2026-07-28: only what its filter asked for, each stamped
    with the listen request's id)."""

    def __init__(self, write, view, session=None, wanted=None, listen_id=None):
        import asyncio
        self.write, self.view, self.session = write, view, session
        self.wanted, self.listen_id = wanted, listen_id
        self.resources = set()  # a listen stream's (server, uri) subscribed at the backends
        self.done = asyncio.Event()

    def wants(self, server, method, params):
        if self.view is not None and self.view != server:
            return False
        if method == "notifications/resources/updated":
            resources = self.session.subscriptions if self.session is not None else \
                self.resources
            return (server, params.get("uri")) in resources
        return self.wanted is None or bool(self.wanted.get(MCP_LIST_CHANGED.get(method)))

    def send(self, method, params):
        if self.listen_id is not None:
            params = dict(params, _meta={MCP_META + "subscriptionId": self.listen_id})
        self.write({"jsonrpc": "2.0", "method": method, "params": params})


class MCPFront:
    """The MCP server face over the hub; see the banner. `expose`: the names served (None:
    all but private ones); `secret` signs session ids (shared by serve's workers, so each
    takes the others' sessions); `workers`: requests to clients (sampling) are not sent,
    since the answer may reach another process."""

    def __init__(self, hub, admission=None, *, expose=None, secret=None, workers=False):
        import contextvars
        self.hub, self.admission = hub, admission
        self.expose = None if expose is None else tuple(expose)
        self.secret = secret or os.urandom(32)
        self.workers = workers
        self.sessions = {}  # id -> MCPSession (insertion order = least recently used first)
        self.ended = {}  # ids ended by DELETE (ordered, bounded)
        self.outlets = set()
        self.exchanges = set()  # requests being answered (logs and asks go to their clients)
        self.asks = {}  # id of a request we sent a client -> (its session, the future)
        self.asked = 0
        self.owners = {}  # resource URI -> the server that listed it (for /mcp)
        self.releasing = set()  # release()'s unsubscribes running (held: the loop holds none)
        self.current = contextvars.ContextVar("mcp_exchange", default=None)
        self.closing = False
        hub.notice, hub.asker = self.notice, self.ask
        self.methods = {
            "initialize": self.m_initialize, "server/discover": self.m_discover,
            "ping": self.m_ping, "logging/setLevel": self.m_ping,
            "tools/list": self.m_tools, "tools/call": self.m_call,
            "resources/list": self.m_resources, "resources/templates/list": self.m_templates,
            "resources/read": self.m_forward_uri, "resources/subscribe": self.m_subscribe,
            "resources/unsubscribe": self.m_subscribe,
            "prompts/list": self.m_prompts, "prompts/get": self.m_prompt,
            "completion/complete": self.m_complete,
        }

    # ---- what is served ----

    def exposed(self):
        if self.expose is None:
            return [name for name, spec in self.hub.specs().items() if not spec.get("private")]
        return [name for name in self.hub.specs() if name in self.expose]

    def servers(self, view):
        return [view] if view is not None else self.exposed()

    def capabilities(self):
        return {"tools": {"listChanged": True}, "prompts": {"listChanged": True},
                "resources": {"subscribe": True, "listChanged": True},
                "completions": {}, "logging": {}}

    def server_info(self, view):
        return {"name": "llmhost" if view is None else f"llmhost/{view}",
                "version": __version__}

    # ---- sessions (2025-11-25) ----

    def new_session(self, view, version, caps, client):
        import secrets
        flags = "".join(f for f, cap in (("s", "sampling"), ("e", "elicitation")) if cap in caps)
        payload = f"{secrets.token_hex(12)}-{version.replace('-', '')}-{flags or 'n'}-{view or '*'}"
        session = MCPSession(f"{payload}-{mcp_session_sign(self.secret, payload)}", view,
                             version, caps, client)
        self.keep(session)
        return session

    def keep(self, session):
        if len(self.sessions) >= MCP_SESSIONS_MAX:
            idle = next((s for s in self.sessions.values() if not s.outlets and not s.calls), None)
            if idle is not None:
                del self.sessions[idle.id]
                self.release(idle.subscriptions)
        self.sessions[session.id] = session

    def release(self, resources):
        """These (server, uri) have one subscriber fewer (a session ended, a listen stream
        closed): the hub unsubscribes at the backend after the last, in the background."""
        import asyncio
        pairs = list(resources)
        resources.clear()
        if pairs:
            task = asyncio.ensure_future(asyncio.gather(*(
                self.hub.unsubscribe(server, uri) for server, uri in pairs),
                return_exceptions=True))
            self.releasing.add(task)
            task.add_done_callback(self.releasing.discard)

    def session_of(self, sid, view):
        """The session `sid` names on this view, recovered from the id if another process (or
        an eviction) has it; None if the id is not one of ours or was ended."""
        session = self.sessions.get(sid)
        if session is None:
            payload, _, mac = sid.rpartition("-")
            import hmac
            if sid in self.ended or not payload or \
                    not hmac.compare_digest(mac, mcp_session_sign(self.secret, payload)):
                return None
            _, v, flags, where = payload.split("-", 3)
            version = f"{v[:4]}-{v[4:6]}-{v[6:]}"
            caps = {cap: {} for f, cap in (("s", "sampling"), ("e", "elicitation"))
                    if f in flags}
            session = MCPSession(sid, None if where == "*" else where, version, caps, None)
            self.keep(session)
        else:  # (most recently used last)
            del self.sessions[sid]
            self.sessions[sid] = session
        if session.view != view:
            return None
        session.used = time.time()
        return session

    def end(self, session):
        self.sessions.pop(session.id, None)
        self.ended[session.id] = None
        if len(self.ended) > MCP_ENDED_MAX:
            del self.ended[next(iter(self.ended))]
        for outlet in session.outlets:
            outlet.done.set()
        for task in session.calls.values():
            task.cancel()
        self.release(session.subscriptions)

    def status(self):
        """The clients connected now, for /v1/mcp/servers and status."""
        return {"exposed": self.exposed(),
                "sessions": [s.info() for s in self.sessions.values()],
                "streams": len(self.outlets), "requests": len(self.exchanges)}

    # ---- one JSON-RPC message ----

    async def answer(self, x, msg):
        """The response to request `msg` (a dict), as a JSON-RPC message."""
        token = self.current.set(x)
        self.exchanges.add(x)
        try:
            handler = self.methods.get(msg["method"])
            if handler is None:
                raise RPCError(RPC_NO_METHOD, f"Method not found: {str(msg['method'])[:100]}")
            params = msg.get("params") or {}
            if not isinstance(params, dict):
                raise RPCError(RPC_PARAMS, "params must be an object")
            result = await handler(x, params)
            # The server that answers is llmhost, not the backend whose result this may be:
            # a 2026-07-28 result is stamped with our serverInfo, an earlier one has none.
            meta = result.get("_meta") if isinstance(result.get("_meta"), dict) else {}
            meta.pop(MCP_META + "serverInfo", None)
            if x.modern:
                result["_meta"] = dict(meta, **{MCP_META + "serverInfo":
                                                self.server_info(x.view)})
                result.setdefault("resultType", "complete")
                if msg["method"] in MCP_CACHEABLE:  # (held for 0 ms: lists change under us)
                    result.setdefault("ttlMs", 0)
                    result.setdefault("cacheScope", "private")
            else:
                if not meta:
                    result.pop("_meta", None)
                for key in MCP_MODERN_RESULT_KEYS:
                    result.pop(key, None)
            return {"jsonrpc": "2.0", "id": x.rid, "result": result}
        except RPCError as e:
            return {"jsonrpc": "2.0", "id": x.rid, "error": e.rpc}
        except MCPRemoteError as e:
            return {"jsonrpc": "2.0", "id": x.rid, "error": e.rpc}
        except MCPError as e:  # the server cannot be reached now
            return rpc_error(x.rid, MCP_INTERNAL_CODE, e.message)
        finally:
            self.exchanges.discard(x)
            self.current.reset(token)

    def note(self, x, msg):
        """A notification of the client's: cancellation; the rest needs nothing of us."""
        if msg.get("method") == "notifications/cancelled" and x.session is not None:
            task = x.session.calls.get((msg.get("params") or {}).get("requestId"))
            if task is not None:
                task.cancel()

    def answered(self, session, msg):
        """A client's answer to a request we sent it (sampling, elicitation)."""
        pending = self.asks.get(msg.get("id"))
        if pending is not None and pending[0] is session and not pending[1].done():
            pending[1].set_result({k: msg[k] for k in ("result", "error") if k in msg})

    @staticmethod
    def need(params, key, kind=str):
        value = params.get(key)
        if not isinstance(value, kind):
            raise RPCError(RPC_PARAMS, f"params.{key} must be a{'n object' if kind is dict else ' string'}")
        return value

    # ---- methods ----

    async def m_initialize(self, x, params):
        asked = params.get("protocolVersion")
        version = asked if asked in MCP_HANDSHAKE_VERSIONS else MCP_HANDSHAKE_VERSIONS[-1]
        caps = params.get("capabilities") if isinstance(params.get("capabilities"), dict) else {}
        info = params.get("clientInfo") if isinstance(params.get("clientInfo"), dict) else {}
        client = f"{info.get('name', '?')} {info.get('version', '')}".strip()[:100]
        x.session = self.new_session(x.view, version, caps, client)
        return {"protocolVersion": version, "capabilities": self.capabilities(),
                "serverInfo": self.server_info(x.view)}

    async def m_discover(self, x, params):
        return {"supportedVersions": [MCP_MODERN_VERSION], "capabilities": self.capabilities()}

    async def m_ping(self, x, params):
        return {}

    async def gather(self, x, kind):
        """What every server of the view lists of `kind`: [(server, items)]. On /mcp a server
        that fails is left out (and logged); on /mcp/NAME its error is the answer."""
        import asyncio
        servers = self.servers(x.view)
        lists = await asyncio.gather(*(self.hub.listing(s, kind) for s in servers),
                                     return_exceptions=True)
        out = []
        for server, items in zip(servers, lists):
            if isinstance(items, BaseException):
                if x.view is not None or not isinstance(items, MCPError):
                    raise items
                mcp_log().warning("MCP server %s left out of /mcp's %s: %s", server, kind,
                                  items.message)
                continue
            out.append((server, items))
        return out

    async def named(self, x, kind):
        """{name the client sees: (server, the server's name, the item)} for tools or prompts:
        on /mcp/NAME the server's own names; on /mcp `<server>__<name>`, as models see tools."""
        taken, out = set(), {}
        for server, items in await self.gather(x, kind):
            for item in items:
                name = item["name"] if x.view is not None else \
                    mcp_tool_name(server, item["name"], taken)
                out[name] = (server, item["name"], item)
        return out

    async def m_tools(self, x, params):
        return {"tools": [dict(item, name=name) if name != item["name"] else item
                          for name, (_, _, item) in (await self.named(x, "tools")).items()]}

    async def m_prompts(self, x, params):
        return {"prompts": [dict(item, name=name) if name != item["name"] else item
                            for name, (_, _, item) in (await self.named(x, "prompts")).items()]}

    async def route(self, x, kind, name):
        """-> (server, the server's name) of a tool or prompt the client names."""
        if x.view is not None:
            return x.view, name
        found = (await self.named(x, kind)).get(name)
        if found is None:
            raise RPCError(RPC_PARAMS, f"Unknown {kind[:-1]}: {name[:100]}")
        return found[0], found[1]

    async def forward(self, x, server, method, params):
        x.server = server
        progress = None
        if x.progress_token is not None and x.emit is not None:
            async def progress(done, total, message):
                note = {"progressToken": x.progress_token, "progress": done}
                if total is not None:
                    note["total"] = total
                if message:
                    note["message"] = message
                x.emit({"jsonrpc": "2.0", "method": "notifications/progress", "params": note})
        if x.modern:  # (the answers to an InputRequiredResult the server gave before)
            params = dict(params, **{k: x.params[k] for k in MCP_INPUT_KEYS if k in x.params})
        try:
            return await self.hub.forward(server, method, params, progress,
                                          relay=x.caps if x.modern else None)
        finally:
            x.server = None

    async def m_call(self, x, params):
        server, tool = await self.route(x, "tools", self.need(params, "name"))
        arguments = params.get("arguments") or {}
        if not isinstance(arguments, dict):
            raise RPCError(RPC_PARAMS, "params.arguments must be an object")
        return await self.forward(x, server, "tools/call", {"name": tool, "arguments": arguments})

    async def m_prompt(self, x, params):
        server, name = await self.route(x, "prompts", self.need(params, "name"))
        return await self.forward(x, server, "prompts/get",
                                  {"name": name, "arguments": params.get("arguments")})

    async def paged(self, x, kind, params):
        """One page of resources or templates -> ([(server, items)], next cursor). The
        client's cursor is routed to the backends: on /mcp/NAME it is the server's, passed on
        as it is, and so is the server's next one; on /mcp ours says where each server that
        has more is ({server: its cursor}, encoded), and one page of /mcp is the next page
        of each of them (the first: of every server). A server that fails is left out of
        /mcp's page, as gather() leaves it out."""
        import asyncio
        import base64
        cursor = params.get("cursor")
        if cursor is not None and not isinstance(cursor, str):
            raise RPCError(RPC_PARAMS, "Invalid params: cursor must be a string")
        if x.view is not None:
            items, after = await self.hub.page(x.view, kind, cursor)
            return [(x.view, items)], after
        if cursor is None:
            where = {server: None for server in self.exposed()}
        else:
            try:
                where = json_loads(base64.urlsafe_b64decode(cursor.encode()))
                if not isinstance(where, dict) or not all(
                        isinstance(v, str) for v in where.values()):
                    raise ValueError(cursor)
            except (ValueError, UnicodeError):
                raise RPCError(RPC_PARAMS, "Invalid params: unknown cursor") from None
            exposed = self.exposed()
            where = {server: at for server, at in where.items() if server in exposed}
        pages = await asyncio.gather(*(self.hub.page(server, kind, at)
                                       for server, at in where.items()),
                                     return_exceptions=True)
        out, after = [], {}
        for server, got in zip(where, pages):
            if isinstance(got, BaseException):
                if not isinstance(got, MCPError):
                    raise got
                mcp_log().warning("MCP server %s left out of /mcp's %s: %s", server, kind,
                                  got.message)
                continue
            out.append((server, got[0]))
            if got[1] is not None:
                after[server] = got[1]
        return out, base64.urlsafe_b64encode(json_bytes(after)).decode() if after else None

    async def m_resources(self, x, params):
        out = []
        pages, after = await self.paged(x, "resources", params)
        for server, items in pages:
            for item in items:
                if len(self.owners) < MCP_SESSIONS_MAX or item["uri"] in self.owners:
                    self.owners[item["uri"]] = server
                out.append(item)
        return dict({"resources": out}, **({"nextCursor": after} if after else {}))

    async def m_templates(self, x, params):
        pages, after = await self.paged(x, "templates", params)
        return dict({"resourceTemplates": [item for _, items in pages for item in items]},
                    **({"nextCursor": after} if after else {}))

    async def owner(self, x, uri):
        """The server of resource `uri` (on /mcp: the one that lists it, or whose template
        makes it)."""
        if x.view is not None:
            return x.view
        if self.owners.get(uri) in self.exposed():
            return self.owners[uri]
        for server, items in await self.gather(x, "resources"):
            if any(item["uri"] == uri for item in items):
                self.owners[uri] = server
                return server
        for server, items in await self.gather(x, "templates"):
            if any(mcp_template_matches(item["uriTemplate"], uri) for item in items):
                return server
        raise RPCError(RPC_NOT_FOUND, f"Resource not found: {uri[:200]}")

    async def m_forward_uri(self, x, params):
        uri = self.need(params, "uri")
        return await self.forward(x, await self.owner(x, uri), "resources/read", {"uri": uri})

    async def m_subscribe(self, x, params):
        """resources/subscribe and unsubscribe (2025-11-25): the session's subscriptions,
        each one subscriber at the hub (which maps it onto a 2026-07-28 backend's listen
        stream). Subscribing twice is once; unsubscribing what is not subscribed, nothing."""
        uri = self.need(params, "uri")
        if x.session is None:
            raise RPCError(RPC_NO_METHOD, f"Method not found: {x.method} is not of "
                           f"{MCP_MODERN_VERSION}")
        server = await self.owner(x, uri)
        if x.method == "resources/unsubscribe":
            if (server, uri) in x.session.subscriptions:
                x.session.subscriptions.discard((server, uri))
                await self.hub.unsubscribe(server, uri)
            return {}
        if (server, uri) not in x.session.subscriptions:
            x.server = server
            try:
                await self.hub.subscribe(server, uri)
            finally:
                x.server = None
            if x.session.id in self.sessions and (server, uri) not in x.session.subscriptions:
                x.session.subscriptions.add((server, uri))
            else:  # (ended meanwhile, or subscribed by another request meanwhile)
                self.release([(server, uri)])
        return {}

    async def m_complete(self, x, params):
        ref = self.need(params, "ref", dict)
        if ref.get("type") == "ref/prompt":
            server, name = await self.route(x, "prompts", self.need(ref, "name"))
            ref = dict(ref, name=name)
        else:
            uri = self.need(ref, "uri")
            server = x.view
            if server is None:
                server = next((s for s, items in await self.gather(x, "templates")
                               if any(i["uriTemplate"] == uri for i in items)), None)
            if server is None:
                raise RPCError(RPC_PARAMS, f"No resource template {uri[:200]}")
        return await self.forward(x, server, "completion/complete", dict(params, ref=ref))

    # ---- what backends send ----

    def caller(self, server):
        """The request waiting for `server` whose client a backend's log line or request is
        for: the one whose task asks (a 2026 server's requests come inside its result), else
        the only one waiting for that server; None when several clients are (which one's call
        caused it is not said), so none gets another's data."""
        x = self.current.get()
        if x is not None and x.server == server:
            return x
        waiting = [x for x in self.exchanges if x.server == server]
        clients = {id(x.session) if x.session is not None else id(x) for x in waiting}
        return waiting[0] if len(clients) == 1 else None

    def notice(self, server, method, params):
        """A backend's notification: logs go to the client of the call they belong to; list
        changes and resource updates to the streams that asked for them."""
        if method == "notifications/message":
            x = self.caller(server)
            if x is not None and x.emit is not None and x.log_level:
                x.emit({"jsonrpc": "2.0", "method": method, "params": params})
            return
        if server not in self.exposed():
            return
        for outlet in list(self.outlets):
            if outlet.wants(server, method, params):
                outlet.send(method, params)

    async def ask(self, server, method, params):
        """A backend's sampling or elicitation request, sent to the client whose call caused
        it if that client declared the capability and can be asked (a 2025-11-25 session,
        one process) -> its answer ({"result"} or {"error"}), or None (the hub answers)."""
        import asyncio
        x = self.caller(server)
        capability = "sampling" if method.startswith("sampling/") else "elicitation"
        if x is None or x.modern or x.emit is None or self.workers or \
                capability not in (x.caps or {}):
            return None
        self.asked += 1
        rid = f"llmhost-{self.asked}"
        future = asyncio.get_running_loop().create_future()
        self.asks[rid] = (x.session, future)
        try:
            x.emit({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
            return await asyncio.wait_for(future, MCP_ASK_TIMEOUT)
        except asyncio.TimeoutError:
            return {"error": {"code": MCP_TIMEOUT_CODE, "message": "the client did not answer"}}
        finally:
            del self.asks[rid]

    def close(self):
        """Shutdown: streams end (their clients reconnect elsewhere or later)."""
        self.closing = True
        for outlet in list(self.outlets):
            outlet.done.set()

    # ---- streamable HTTP ----

    def view_of(self, rest):
        if rest is None:
            return None
        from urllib.parse import unquote
        name = unquote(rest)
        if name not in self.exposed():
            raise NotFound(f"No MCP server {name!r} is served here; served: "
                           f"{', '.join(self.exposed()) or 'none'}.")
        return name

    def session_header(self, request, view):
        """The session a 2025-11-25 request names (400 without one, 404 for one we do not
        have: the client then starts a new one, as the spec says)."""
        sid = request.headers.get("mcp-session-id")
        if sid is None:
            raise BadRequest("Bad Request: No valid session ID provided")
        session = self.session_of(sid, view)
        if session is None:
            raise NotFound("Session not found")
        return session

    async def http_post(self, request, rest=None):
        import asyncio
        view = self.view_of(rest)
        conn = request.conn
        try:
            msg = json_loads(request.body)
        except (ValueError, UnicodeDecodeError):
            return self.reply(request, 400, rpc_error(None, RPC_PARSE, "Parse error"))
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
            return self.reply(request, 400, rpc_error(None, RPC_INVALID, "Invalid Request: one "
                                                      "JSON-RPC 2.0 message per POST"))
        method, params = msg.get("method"), msg.get("params")
        params = params if isinstance(params, dict) else {}
        meta = params.get("_meta") if isinstance(params.get("_meta"), dict) else {}
        header = request.headers.get("mcp-protocol-version")
        modern = "mcp-session-id" not in request.headers and \
            (MCP_META + "protocolVersion" in meta or
             header == MCP_MODERN_VERSION and method != "initialize")
        session = None
        refusal = mcp_modern_refusal(msg, meta, request.headers) if modern and "id" in msg \
            else None
        if refusal is not None:
            return self.reply(request, RPC_HTTP_STATUS[refusal["error"]["code"]], refusal)
        if not modern and method != "initialize":
            session = self.session_header(request, view)
            session.requests += 1
        headers = [] if session is None else [("Mcp-Session-Id", session.id)]
        if method is None or "id" not in msg:  # a response of the client's, or a notification
            if method is None:
                self.answered(session, msg)
            else:
                self.note(MCPExchange(view, session, None, params, None, modern), msg)
            request.status = 202
            return request.conn.respond(request, 202, headers)
        if not isinstance(method, str):
            return self.reply(request, 400, rpc_error(msg.get("id"), RPC_INVALID,
                                                      "method must be a string"))
        streams = "text/event-stream" in request.headers.get("accept", "")
        out = {"streaming": False}

        def emit(note):
            if conn.gone:
                return
            if not out["streaming"]:
                out["streaming"] = True
                request.status = 200
                out["keep_alive"] = conn.start_stream(request, 200, MCP_SSE + headers)
            conn.write_chunk(rpc_event(note))

        x = MCPExchange(view, session, msg["id"], params, emit if streams else None, modern)
        x.method = method
        if method == "subscriptions/listen":
            if not modern or not streams:
                return self.reply(request, 400, rpc_error(x.rid, RPC_INVALID, "subscriptions/"
                                  "listen is of 2026-07-28 and answers as an SSE stream"))
            return await self.listen(request, x, params, emit, out)
        admitted = method in MCP_ADMITTED and self.admission is not None
        if admitted:
            await self.admission.acquire(conn)
        try:
            task = asyncio.ensure_future(self.answer(x, msg))
            conn.on_gone = task.cancel
            if session is not None:
                session.calls[x.rid] = task
            try:
                response = await task
            except asyncio.CancelledError:
                if conn.gone or not task.cancelled():
                    raise
                response = rpc_error(x.rid, RPC_CANCELLED, "Request cancelled")
            finally:
                conn.on_gone = None
                if session is not None:
                    session.calls.pop(x.rid, None)
        finally:
            if admitted:
                self.admission.release()
        if x.session is not None and session is None:  # initialize made one
            headers.append(("Mcp-Session-Id", x.session.id))
            x.session.requests += 1
        if conn.gone:
            return False
        if out["streaming"]:
            conn.end_stream(rpc_event(response))
            return out["keep_alive"]
        if streams and not modern:
            # 2025-11-25: an SSE stream of one event, as the SDK's and the TypeScript SDK's
            # servers answer a client that accepts one (sent whole, with its length)
            request.status = 200
            return conn.respond(request, 200, MCP_SSE + headers, rpc_event(response))
        status = RPC_HTTP_STATUS.get(response.get("error", {}).get("code"), 200) if modern \
            else 200
        return self.reply(request, status, response, headers)

    def reply(self, request, status, doc, headers=()):
        request.status = status
        return request.conn.respond(request, status, JSON_TYPE + list(headers), json_bytes(doc))

    async def hold(self, request, outlet, before=None):
        """Keep a notification stream open until its client leaves, its session ends or serve
        stops; a comment now and then keeps proxies from closing it. Holds no admission slot."""
        import asyncio
        conn = request.conn
        self.outlets.add(outlet)
        if outlet.session is not None:
            outlet.session.outlets.add(outlet)
        conn.on_gone = outlet.done.set
        try:
            if before is not None:
                before()
            while not outlet.done.is_set() and not self.closing:
                try:
                    await asyncio.wait_for(outlet.done.wait(), MCP_STREAM_PING)
                except asyncio.TimeoutError:
                    conn.write_chunk(b": ping\n\n")
                if conn.transport.get_write_buffer_size() > MCP_STREAM_BUFFER:
                    return False  # a client that stopped reading: dropped, not buffered
        finally:
            conn.on_gone = None
            self.outlets.discard(outlet)
            if outlet.session is not None:
                outlet.session.outlets.discard(outlet)
        return not conn.gone

    async def http_get(self, request, rest=None):
        """The 2025-11-25 GET stream: what the server says unasked (list changes, updates)."""
        view = self.view_of(rest)
        if "text/event-stream" not in request.headers.get("accept", ""):
            raise HTTPError("Not Acceptable: the client must accept text/event-stream",
                            status=406, code="not_acceptable")
        if request.method == "HEAD":
            raise MethodNotAllowed("HEAD is not allowed on an MCP endpoint.")
        session = self.session_header(request, view)
        conn = request.conn
        request.status = 200
        keep_alive = conn.start_stream(request, 200, MCP_SSE + [("Mcp-Session-Id", session.id)])

        def write(msg):
            if not conn.gone:
                conn.write_chunk(rpc_event(msg))

        if not await self.hold(request, MCPOutlet(write, view, session=session)):
            return False
        conn.end_stream()
        return keep_alive

    async def listen(self, request, x, params, emit, out):
        """subscriptions/listen (2026-07-28): an acknowledgement, then the notifications its
        filter asks for, until the client closes it; a stop of serve ends it with a result."""
        wanted = params.get("notifications") if isinstance(params.get("notifications"), dict) \
            else {}
        honored = {k: True for k in MCP_LIST_CHANGED.values() if wanted.get(k)}
        meta = {MCP_META + "subscriptionId": x.rid}
        outlet = MCPOutlet(emit, x.view, wanted=honored, listen_id=x.rid)
        try:
            uris = await self.watch(x, wanted.get("resourceSubscriptions"), outlet.resources)
            if uris:
                honored["resourceSubscriptions"] = uris
            if not await self.hold(request, outlet, before=lambda: emit({
                    "jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged",
                    "params": {"notifications": honored, "_meta": meta}})):
                return False
        finally:
            self.release(outlet.resources)
        request.conn.end_stream(rpc_event({"jsonrpc": "2.0", "id": x.rid, "result": {
            "_meta": meta, "resultType": "complete"}}))
        return out["keep_alive"]

    async def watch(self, x, uris, resources):
        """A listen stream's resourceSubscriptions, each subscribed at the server that has
        it (added to `resources` as (server, uri)) -> the URIs honored: not those no server
        of the view has, nor those their server refused."""
        honored = []
        for uri in uris if isinstance(uris, list) else ():
            if not isinstance(uri, str) or uri in honored:
                continue
            try:
                server = await self.owner(x, uri)
                await self.hub.subscribe(server, uri)
            except (RPCError, MCPError) as e:
                mcp_log().info("MCP listen: %s not subscribed: %s", uri[:200],
                               getattr(e, "message", None) or e)
                continue
            resources.add((server, uri))
            honored.append(uri)
        return honored

    async def http_delete(self, request, rest=None):
        session = self.session_header(request, self.view_of(rest))
        self.end(session)
        request.status = 200
        return request.conn.respond(request, 200, [("Mcp-Session-Id", session.id)])

    # ---- stdio (`mcp serve --stdio`) ----

    async def serve_stdio(self, view, reader, write):
        """Serve one client on a line-delimited JSON-RPC stream (MCP's stdio transport):
        `reader` an asyncio StreamReader, `write(msg)` puts one message out. Requests are
        answered concurrently, as they may take long; ends at EOF."""
        import asyncio
        session = None
        outlet = None
        tasks = set()
        listens = []  # its subscriptions/listen streams

        async def run(x, msg):
            response = await self.answer(x, msg)
            if session is not None:
                session.calls.pop(x.rid, None)
            write(response)

        while True:
            line = await reader.readline()
            if not line:
                break
            try:
                msg = json_loads(line)
            except (ValueError, UnicodeDecodeError):
                write(rpc_error(None, RPC_PARSE, "Parse error"))
                continue
            if not isinstance(msg, dict):
                write(rpc_error(None, RPC_INVALID, "Invalid Request"))
                continue
            method, params = msg.get("method"), msg.get("params")
            params = params if isinstance(params, dict) else {}
            meta = params.get("_meta") if isinstance(params.get("_meta"), dict) else {}
            modern = method != "initialize" and session is None
            if method is None:
                self.answered(session, msg)
                continue
            x = MCPExchange(view, session, msg.get("id"), params, write, modern)
            x.method = method
            if "id" not in msg:
                self.note(x, msg)
                continue
            # (a stdio client that stamps no version is taken as 2026-07-28's, as before)
            stamped = MCP_META + "protocolVersion" in meta
            refusal = mcp_modern_refusal(msg, meta) if modern and stamped else None
            if refusal is not None:
                write(refusal)
                continue
            if method == "initialize":
                write(await self.answer(x, msg))
                session = x.session
                outlet = MCPOutlet(write, view, session=session)
                self.outlets.add(outlet)
                continue
            if method == "subscriptions/listen":  # (on stdio: the stream's notifications)
                wanted = params.get("notifications") or {}
                wanted = wanted if isinstance(wanted, dict) else {}
                listening = MCPOutlet(write, view, wanted=wanted, listen_id=x.rid)
                uris = await self.watch(x, wanted.get("resourceSubscriptions"),
                                        listening.resources)
                honored = dict(wanted, resourceSubscriptions=uris) if uris else \
                    {k: v for k, v in wanted.items() if k != "resourceSubscriptions"}
                listens.append(listening)
                self.outlets.add(listening)
                write({"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged",
                       "params": {"notifications": honored,
                                  "_meta": {MCP_META + "subscriptionId": x.rid}}})
                continue
            task = asyncio.ensure_future(run(x, msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if session is not None:
                session.calls[x.rid] = task
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if outlet is not None:
            self.outlets.discard(outlet)
        for listening in listens:
            self.outlets.discard(listening)
            self.release(listening.resources)
        if session is not None:
            self.end(session)


# =============================================================================
# Chat format
# =============================================================================
# Owns: the chat-completions shapes every route and the tool loop share: checking a client's
# body (required fields, types, bounds, duplicate keys), reading an upstream's answer, chunk
# and error body, and the few transformations a route makes (base64 embeddings, rerank).
# Raises: BadRequest for a client's body, UpstreamError for an upstream's of another shape.
# Never: does I/O.

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
SSE_HEADERS = [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]
SSE_DONE = (b"data: [DONE]\n\n", b"data: [DONE]\r\n\r\n", b"data:[DONE]\n\n")  # a stream's end
JSON_TYPE = [("Content-Type", "application/json")]

# endpoint -> its required fields, their types (and that of their items)
REQUIRED = {
    "chat": (("model", str), ("messages", list, dict)),
    "completions": (("model", str), ("prompt", (str, list))),
    "embeddings": (("model", str), ("input", (str, list))),
    "rerank": (("model", str), ("query", str), ("documents", list)),
    "responses": (("model", str),),
    "messages": (("model", str), ("messages", list, dict)),  # (max_tokens: messages_as_chat)
}
TYPE_NAMES = {str: "a string", list: "an array", (str, list): "a string or an array",
              dict: "an object"}
# endpoint -> integer fields and their (least, most) values, refused as OpenAI refuses them:
# n is at most 128 (OpenAI's limit: each choice is a generation); top_n is no negative count.
BOUNDS = {
    "chat": (("n", 1, 128),),
    "completions": (("n", 1, 128),),
    "embeddings": (),
    "rerank": (("top_n", 0, None),),
    "responses": (("max_output_tokens", 1, None),),
    "messages": (("max_tokens", 1, None),),
}


def json_kind(value):
    """What a JSON value is, as an error message says it: "a list", "an object"..."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    return "null" if value is None else "a boolean" if isinstance(value, bool) else "a number"


UTF8_BOM = b"\xef\xbb\xbf"


def parse_json_body(request, kind):
    """The request's JSON object for the endpoint `kind` (a key of REQUIRED), its fields
    checked; its model is noted for the access log (so a request refused later, say for an
    unknown model, still names it)."""
    if not request.body:
        raise BadRequest("The request body is empty; send a JSON object.", code="invalid_json")
    raw = request.body
    if raw[:3] == UTF8_BOM:  # (JSON is UTF-8, RFC 8259 §8.1; a byte order mark is ignored, as
        raw = raw[3:]  # json.loads ignores it; the "utf-8-sig" codec is Python code, 5x slower)
    try:
        body = json_loads(raw.decode(), REQUEST_JSON)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    # The body is forwarded as it came: a key given twice, which we read as its last value, an
    # upstream may read as its first (RFC 8259 §4 leaves it open), and be sent another model.
    if type(body) is DuplicateKeys:
        raise BadRequest(f"The request body has the key '{body.key[:100]}' more than once; "
                         "send each key once.", param=body.key[:100], code="duplicate_key")
    check_fields(body, REQUIRED[kind])
    check_bounds(body, BOUNDS[kind])
    if body.get("stream") is not None and not isinstance(body["stream"], bool):  # ("yes")
        raise BadRequest("Invalid type for 'stream': expected a boolean.", param="stream",
                         code="invalid_type")
    request.model = body["model"]
    return body


def check_fields(body, required):
    for field, kind, *items in required:
        value = body.get(field)
        if value is None:
            raise BadRequest(f"Missing required parameter: '{field}'.", param=field,
                             code="missing_required_parameter")
        if not isinstance(value, kind) or (isinstance(value, list) and not value and
                                           field != "input"):
            raise BadRequest(f"Invalid type for '{field}': expected {TYPE_NAMES[kind]}"
                             f"{' (not empty)' if isinstance(value, list) else ''}.",
                             param=field, code="invalid_type")
        for i, item in enumerate(value if items else ()):
            if not isinstance(item, items[0]):
                raise BadRequest(f"Invalid type for '{field}[{i}]': expected "
                                 f"{TYPE_NAMES[items[0]]}, but got {json_kind(item)} instead.",
                                 param=f"{field}[{i}]", code="invalid_type")


def check_bounds(body, bounds):
    """Integer fields within their (least, most), in OpenAI's words; null is their default."""
    for field, least, most in bounds:
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadRequest(f"Invalid type for '{field}': expected an integer, but got "
                             f"{json_kind(value)} instead.", param=field, code="invalid_type")
        if value < least:
            raise BadRequest(f"Invalid '{field}': integer below minimum value. Expected a value "
                             f">= {least}, but got {value} instead.", param=field,
                             code="integer_below_min_value")
        if most is not None and value > most:
            raise BadRequest(f"Invalid '{field}': integer above maximum value. Expected a value "
                             f"<= {most}, but got {value} instead.", param=field,
                             code="integer_above_max_value")


def unforced(choice):
    """A tool_choice for a tool loop's later rounds: one that forces a call ("required", a
    named function or custom tool) becomes "auto", else a model that obeys it calls a tool
    again every round (the OpenAI Agents SDK resets it too); an allowed_tools list is kept,
    its mode "required" made "auto"; anything else is left as it is."""
    if choice == "required":
        return "auto"
    if isinstance(choice, dict):
        if choice.get("type") in ("function", "custom"):
            return "auto"
        allowed = choice.get("allowed_tools")
        if choice.get("type") == "allowed_tools" and isinstance(allowed, dict) and \
                allowed.get("mode") == "required":
            return dict(choice, allowed_tools=dict(allowed, mode="auto"))
    return choice


def upstream_json(body, what):
    """An upstream answer llmhost must read, parsed; UpstreamError (502) if it is no JSON."""
    try:
        return json_loads(body)
    except ValueError:  # (UnicodeDecodeError is one)
        raise UpstreamError(f"upstream {what} answer is not JSON", code="upstream_format") \
            from None


def completion_message(data):
    """-> (document, first choice's message) of a chat completion body, or (None, None) when
    the body is not one the tool loop can read (some servers answer 200 with an error object
    or nothing usable): it is then passed on as it came."""
    try:
        doc = json_loads(data)
        message = doc["choices"][0]["message"]
    except (ValueError, UnicodeDecodeError, KeyError, IndexError, TypeError):
        return None, None
    if not isinstance(message, dict) or message_problem(message, "message"):
        return None, None
    return doc, message


def objects_problem(items, where):
    """Why `items` (None, or what should be a list of objects) is not one, or None."""
    if items is None:
        return None
    if not isinstance(items, list):
        return f"{where} is {json_kind(items)}, not a list"
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            return f"{where}[{i}] is {json_kind(item)}, not an object"
    return None


def message_problem(message, where, stream=False):
    """Why the tool loop cannot read a chat message (or, `stream`, a chunk's delta), or None:
    its content must be a string or null; its tool_calls a list of objects, each function an
    object with a string name (streamed: a string piece of the arguments and an integer
    index, as OpenAI's chat.completion.chunk has them)."""
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        return f"{where}.content is {json_kind(content)}, not a string"
    calls = message.get("tool_calls")
    if calls is None:
        return None
    problem = objects_problem(calls, f"{where}.tool_calls")
    if problem:
        return problem
    for i, call in enumerate(calls):
        fn = call.get("function")
        if fn is None:
            continue
        if not isinstance(fn, dict) or not isinstance(fn.get("name", ""), (str, type(None))) \
                or stream and (not isinstance(fn.get("arguments", ""), (str, type(None))) or
                               not isinstance(call.get("index", 0), (int, type(None)))):
            return f"{where}.tool_calls[{i}] is not a tool call (function name and arguments " \
                "as strings)"
    return None


_TEXT_TYPES = (str, type(None))


def chunk_problem(doc):
    """Why the tool loop cannot read a streamed chat chunk (a JSON object), or None."""
    choices = doc.get("choices")
    problem = objects_problem(choices, "choices")
    if choices is None or problem:
        return problem
    for i, choice in enumerate(choices):
        delta = choice.get("delta")
        if delta is not None:
            if not isinstance(delta, dict):
                return f"choices[{i}].delta is {json_kind(delta)}, not an object"
            if "tool_calls" not in delta and delta.get("content").__class__ in _TEXT_TYPES:
                continue  # (a token's text: most chunks of a stream)
            problem = message_problem(delta, f"choices[{i}].delta", stream=True)
            if problem:
                return problem
    return None


def completion_as_chunk(doc, message):
    """A whole chat completion as one streamed chunk (for servers that ignore "stream")."""
    delta = {k: v for k, v in message.items() if v is not None and k != "tool_calls"}
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls:
        delta["tool_calls"] = [dict(call, index=i) for i, call in enumerate(calls)
                               if isinstance(call, dict)]
        for call in delta["tool_calls"]:  # some servers send the arguments as an object
            fn = call.get("function")
            if isinstance(fn, dict) and not isinstance(fn.get("arguments", ""), str):
                call["function"] = dict(fn, arguments=json.dumps(fn["arguments"]))
    return dict(doc, object="chat.completion.chunk", choices=[{
        "index": 0, "delta": delta, "finish_reason": doc["choices"][0].get("finish_reason")}])


def estimate_tokens(chat, image_tokens):
    """A chat body's input tokens, estimated where no upstream tokenizer is asked (the Responses
    API's input_tokens, the Messages API's count_tokens): a token per ESTIMATE_CHARS_PER_TOKEN
    characters of text (tools as their JSON), `image_tokens` per image or file (each API has
    its own figure), ESTIMATE_TOKENS_PER_MESSAGE per message for its framing."""
    chars = len(json_bytes(chat.get("tools") or []))
    attachments = 0
    for message in chat["messages"]:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") == "text":
                chars += len(part.get("text") or "")
            else:
                attachments += 1
        if message.get("tool_calls"):
            chars += len(json_bytes(message["tool_calls"]))
    return (-(-chars // ESTIMATE_CHARS_PER_TOKEN) + attachments * image_tokens
            + ESTIMATE_TOKENS_PER_MESSAGE * len(chat["messages"]))


class Face:
    """How one API shapes its errors: OpenAI's envelope here; the Responses and Messages faces
    have their own. A route's face is in Application.faces."""

    def error_body(self, exc):
        return json_bytes(exc.envelope())

    def error_event(self, exc):
        """The event that ends a stream that failed after its head went out."""
        return sse_event(exc.envelope())

    # -- a relayed answer (chat's; a Responses or Messages one an entry's "native" API gave) --
    def upstream_error(self, status, body):
        """An upstream's error body in this API's envelope (passed as it is if it is one)."""
        return error_envelope_bytes(status, body)

    def stream_ended(self, data):
        """Whether relayed SSE bytes hold the event that ends a whole stream of this API."""
        return b"[DONE]" in data

    def stream_error(self, exc, last):
        """The event that ends a relayed stream that died; `last`: the bytes relayed last."""
        return self.error_event(exc)

    def native_fields(self, headers):
        """Header lines of the client's request that an upstream of this API needs too."""
        return ""


OPENAI_FACE = Face()


def upstream_error_message(status, body):
    """-> (the message of an upstream's error body, whether the body is OpenAI's envelope)."""
    try:
        doc = json_loads(body)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict):
        error = doc.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"]), True
        if isinstance(error, str):
            return error, False  # Ollama, TGI: {"error": "..."}
        if isinstance(doc.get("detail"), (str, list)):
            return str(doc["detail"]), False  # FastAPI-based servers
    return body.decode("utf-8", "replace").strip()[:2000] or REASONS.get(status, "error"), False


def error_envelope_bytes(status, body):
    """An upstream's error body, wrapped in OpenAI's envelope unless it already is one."""
    message, envelope = upstream_error_message(status, body)
    if envelope:
        return body
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json_bytes({"error": {"message": f"upstream: {message}", "type": kind, "param": None,
                                 "code": f"upstream_{status}"}})


def embeddings_as_base64(body):
    """Encode float embeddings as base64 float32 (what the openai client asks for by default)
    for upstreams that ignore `encoding_format`. An answer of another shape (llama.cpp's own
    /embeddings, at its root: a list of nested arrays) is a 502 that says what was expected."""
    import array
    import base64
    doc = upstream_json(body, "embeddings")
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        got = json_kind(doc) if not isinstance(doc, dict) else 'an object without a "data" list'
        raise UpstreamError('upstream embeddings answer is not an OpenAI embeddings object '
                            f'(expected {{"data": [...]}}, got {got})', code="upstream_format")
    changed = False
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise UpstreamError(f"upstream embeddings answer is not an OpenAI embeddings object "
                                f"(data[{i}] is {json_kind(item)}, not an object)",
                                code="upstream_format")
        vector = item.get("embedding")
        if isinstance(vector, list):  # (a string: base64 already, as was asked)
            try:
                floats = array.array("f", vector)
            except (TypeError, OverflowError):
                raise UpstreamError("upstream embeddings answer is not an OpenAI embeddings "
                                    f"object (data[{i}].embedding is not a list of numbers)",
                                    code="upstream_format") from None
            if sys.byteorder == "big":
                floats.byteswap()  # the wire format is little-endian
            item["embedding"] = base64.b64encode(floats.tobytes()).decode()
            changed = True
    return json_bytes(doc) if changed else body


def rerank_documents(documents):
    texts = []
    for i, doc in enumerate(documents):
        if isinstance(doc, dict) and isinstance(doc.get("text"), str):
            texts.append(doc["text"])
        elif isinstance(doc, str):
            texts.append(doc)
        else:
            raise BadRequest(f"documents[{i}] must be a string or an object with 'text'.",
                             param="documents", code="invalid_type")
    return texts


def normalize_rerank(body, model, texts, top_n, return_documents):
    """llama.cpp, vLLM, Jina, Cohere and TEI answers -> {model, results: [{index,
    relevance_score, document?}]}, best first."""
    doc = upstream_json(body, "rerank")
    items = doc.get("results", doc.get("data")) if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        got = json_kind(doc) if not isinstance(doc, dict) else 'an object without a "results" list'
        raise UpstreamError('upstream rerank answer has no results list (expected {"results": '
                            f'[...]}}, got {got})', code="upstream_format")
    results = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("index"), int) \
                or not 0 <= item["index"] < len(texts):
            raise UpstreamError("upstream rerank answer has a result without a valid index",
                                code="upstream_format")
        score = item.get("relevance_score", item.get("score"))
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise UpstreamError("upstream rerank answer has a result whose relevance_score is "
                                f"{json_kind(score)}, not a number", code="upstream_format")
        result = {"index": item["index"], "relevance_score": score}
        if return_documents:
            result["document"] = {"text": texts[item["index"]]}
        results.append(result)
    results.sort(key=lambda r: -(r["relevance_score"] or 0.0))
    if isinstance(top_n, int) and top_n >= 0:
        results = results[:top_n]
    out = {"object": "list", "model": model, "results": results}
    if isinstance(doc, dict):
        for key in ("id", "usage"):
            if key in doc:
                out[key] = doc[key]
    return json_bytes(out)


# =============================================================================
# Send path
# =============================================================================
# Owns: getting one request's answer from the servers of its model: the waits for a global
# slot and for a server with room, the attempts in Router order, what each answer means for
# the server's health (after_answer).
# Raises: HTTPError subclasses (UpstreamError when no server answered, RateLimited when the
# wait was too long, ClientGone when the client left).
# Never: reads an answer's body for the client (the caller's `deliver` does) nor knows which
# API the client speaks.

RETRY_STATUSES = frozenset({429, 502, 503, 504})
# llama.cpp's 500 for an input its model cannot read (see Sender.attempt)
_INPUT_REFUSED = re.compile(rb"(?:image|audio|video) input is not supported")


def after_answer(status, final):
    """What an upstream's answer status means -> (retry, health). `retry`: try the next server
    (a refusal before any byte went out, while one is left: `final` says none is). `health`:
    how the answer marks the server: "rate_limited" (a 429, which cools it at once for its
    Retry-After, as LiteLLM does, whether or not another server is left), "failed" (a 5xx;
    but 501, "not supported here", as llama.cpp answers embeddings without --embeddings,
    which is no sign of ill health: cooling it would stop its chats too) or "ok"."""
    if status == 429:
        health = "rate_limited"
    elif status >= 500 and status != 501:
        health = "failed"
    else:
        health = "ok"
    return status in RETRY_STATUSES and not final, health


def wants_usage_added(body):
    """Whether a request is a stream whose client did not ask for its usage (llmhost asks for
    it anyway, unless the entry says "stream_usage": false, and the usage chunk is taken out
    on the way back)."""
    return body.get("stream") is True and not (
        isinstance(body.get("stream_options"), dict) and body["stream_options"].get(
            "include_usage"))


USAGE_ASKED = b'{"stream_options":{"include_usage":true},'


def with_usage_asked(body, raw, upstream_model):
    """The request `body` (whose unchanged encoding is `raw`, or None) as sent to an upstream
    whose model id is `upstream_model`, asking for its stream's usage. A body with no
    `stream_options` at all is not encoded again: the field goes in front of its bytes
    (duplicate keys were refused, so the one added is the only one)."""
    if raw and upstream_model == body["model"] and "stream_options" not in body:
        raw = raw.lstrip()
        if raw[:1] == b"{":
            return USAGE_ASKED + raw[1:]
    return json_bytes(dict(body, model=upstream_model, stream_options=dict(
        body.get("stream_options") or {}, include_usage=True)))


def without_usage_event(data):
    """-> (whole SSE events `data` without the usage-only chunk of a stream, that chunk or
    None). The chunk is the one whose choices are empty (OpenAI's form of it)."""
    at = data.find(b'"usage"')
    while at >= 0:
        start = data.rfind(b"\n\n", 0, at) + 2 if data.rfind(b"\n\n", 0, at) >= 0 else 0
        end = data.find(b"\n\n", at)
        end = len(data) if end < 0 else end + 2
        event = data[start:end]
        if re.search(rb'"choices"\s*:\s*\[\s*\]', event):
            return data[:start] + data[end:], event
        at = data.find(b'"usage"', end)
    return data, None


class Native:
    """A Responses or Messages request that the entries opted in to its API ("native") are
    sent as the client gave it, at their own endpoint of that API (only the model renamed where
    an entry serves it under another name), instead of the chat body other entries get; and
    `deliver` (as send()'s) relays their answer. `only`: no other entry can answer it (it names
    state that only such a server holds)."""

    def __init__(self, api, body, raw, query, extra, deliver, only=False):
        self.api = api
        self.body = body
        self.raw = raw
        self.suffix = "/" + api + ("?" + query if query else "")
        self.extra = extra  # header lines of the client's the API wants passed on
        self.deliver = deliver
        self.only = only

    def takes(self, up):
        return self.api in up.native

    def payload(self, model):
        return self.raw if model == self.body["model"] and self.raw else json_bytes(
            dict(self.body, model=model))


class Relayed:
    """What a native relay's deliver returns through a loop made for chat answers: the client
    has its answer; `keep_alive` says whether its connection stays open."""

    def __init__(self, keep_alive):
        self.keep_alive = keep_alive


class Sender:
    """The send path, shared by every route and the tool loop: admit(), send(), complete()."""

    def __init__(self, router, client, admission, processes):
        self.router = router
        self.client = client
        self.admission = admission
        self.processes = processes  # ProcessManager for entries llmhost starts itself
        self.capacity_waiters = []  # futures of requests waiting for a server's max_concurrency
        self.failures = {}  # (server name, kind) -> failed attempts (/metrics)
        admission.others = lambda: sum(1 for fut in self.capacity_waiters if not fut.done())

    async def admit(self, model, conn):
        """Wait (in all, up to the queue timeout) for a global slot and a server of `model`
        with room; the caller releases the slot."""
        adm = self.admission
        if adm.active < adm.limit and not adm.waiters and not self.router.all_full(model):
            adm.active += 1  # (the usual case: a slot and a server with room, no wait)
            return
        deadline = time.monotonic() + adm.queue_timeout  # for all its waits
        while True:  # a model whose servers are all at their max_concurrency waits for them
            if self.router.all_full(model):  # first, holding no global slot: requests for
                await self.wait_for_capacity(model, conn, deadline)  # other models wait not
            await self.admission.acquire(conn, deadline)
            try:
                full = self.router.all_full(model)  # (NotFound: a reload removed the model)
            except BaseException:
                self.admission.release()
                raise
            if not full:
                return
            self.admission.release()  # taken again while we waited for the slot

    async def wait_for_capacity(self, model, conn=None, deadline=None):
        """Every server of `model` is at its max_concurrency: wait (FIFO-ish, until `deadline`,
        by default the queue timeout from now) until one has a free slot, like llama.cpp's own
        slot queue would. These waits count toward --queue-size, as the global queue's do."""
        import asyncio
        if deadline is None:
            deadline = time.monotonic() + self.admission.queue_timeout
        loop = asyncio.get_running_loop()
        while True:
            candidates = self.router.resolve(model)
            if not candidates[0][0].full():
                return candidates
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.admission.queued() >= self.admission.queue_size:
                self.admission.rejected += 1
                raise RateLimited(f"every server for '{model}' is at its max_concurrency"
                                  f"{'' if remaining <= 0 else ' and the queue is full'}; "
                                  "retry shortly", headers=[("Retry-After", "1")])
            fut = loop.create_future()
            self.capacity_waiters.append(fut)
            try:
                await wait_unless_gone(fut, remaining, conn)
            except asyncio.TimeoutError:
                pass

    def capacity_freed(self):
        waiters, self.capacity_waiters = self.capacity_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def mark(self, up, health, reason, retry_after=None):
        """Apply an answer's verdict (after_answer) to the server's health."""
        if health != "ok":
            self.failed(up, "http_429" if health == "rate_limited" else "http_5xx")
        if health == "rate_limited":
            self.router.rate_limited(up, parse_retry_after(retry_after))
        elif health == "failed":
            self.router.failed(up, reason)
        else:
            self.router.succeeded(up)

    def failed(self, up, kind):
        key = (up.name, kind)
        self.failures[key] = self.failures.get(key, 0) + 1

    async def send(self, request, body, candidates, suffix, raw, deliver, native=None):
        """Send to each candidate in turn until one answers; `deliver(up, resp, body bytes or
        None for a stream, overhead ms)` then owns the answer (the point of no return). A client
        that leaves meanwhile ends it with ClientGone, so no caller has to check for that.
        `native` (a Native): the entries opted in to its API get it instead (and only they
        are tried if it says so)."""
        model = body["model"]
        conn = request.conn
        if native is not None and native.only:
            candidates = [c for c in candidates if native.takes(c[0])]
        if candidates[0][0].full():  # (an MCP tool loop's later rounds: a request taken in
            candidates = await self.wait_for_capacity(model, conn)  # waits for its model anew)
            if native is not None and native.only:
                candidates = [c for c in candidates if native.takes(c[0])]
        attempts = candidates[:MAX_ATTEMPTS]
        last_error = None

        def attach(upstream_conn):
            conn.upstream = upstream_conn
            if conn.gone:
                upstream_conn.abort()

        for i, (up, upstream_model) in enumerate(attempts):
            relay = native if native is not None and native.takes(up) else None
            payload = raw
            if relay is not None:
                payload = relay.payload(upstream_model)
            elif up.stream_usage and wants_usage_added(body):
                payload = with_usage_asked(body, raw, upstream_model)
            elif upstream_model != model or not payload:
                payload = json_bytes(dict(body, model=upstream_model))
            request.server = up.name
            up.in_flight += 1
            up.requests += 1
            try:
                if up.managed:
                    try:
                        await self.processes.ensure(up)  # started on demand, shared by all
                    except ServiceUnavailable as exc:
                        self.failed(up, "start_failed")
                        last_error = exc
                        continue
                sent = time.monotonic()
                try:  # nothing has gone out yet, so a failure here is still retried
                    resp, data = await self.attempt(up, up.head(
                        "POST", up.origin.base_path + (relay.suffix if relay else suffix),
                        len(payload), request.request_id, relay and relay.api,
                        relay.extra if relay else ""),
                        payload, attach, final=i == len(attempts) - 1)
                except UpstreamError as exc:
                    if conn.gone:
                        raise ClientGone("client closed the request") from None
                    self.router.failed(up, exc.message)
                    self.failed(up, exc.code or "error")
                    last_error = exc
                    continue
                if resp is None:
                    continue  # a refusal marked in attempt(): the next server
                try:
                    return await (relay.deliver if relay else deliver)(
                        up, resp, data, (sent - request.received) * 1000)
                finally:
                    if not resp.done and not resp.draining:
                        resp.close()  # not read to its end: the connection cannot be reused
            finally:
                up.in_flight -= 1
                conn.upstream = None
                if up.managed and up.name in self.processes.servers:
                    self.processes.servers[up.name].last_used = time.monotonic()
                if self.capacity_waiters and up.max_concurrency is not None:
                    self.capacity_freed()
        raise last_error

    async def attempt(self, up, head, payload, attach, final):
        """One server's answer -> (its response, its whole body or None for a stream), or
        (None, None) when it refused and the next server is tried. Raises UpstreamError for a
        failure before any byte of it could go to the client."""
        resp = await self.client.request(up.origin, head, payload, timeout=up.timeout,
                                         connect_timeout=up.connect_timeout,
                                         on_connection=attach)
        status = resp.status
        retry, health = after_answer(status, final)
        if retry:
            resp.close()
            self.mark(up, health, f"HTTP {status}", resp.headers.get("retry-after"))
            return None, None
        data = None
        if status < 300 and resp.headers.get("content-type", "").startswith(
                "text/event-stream"):
            await resp.peek()  # a stream's first event: llama.cpp sends its head before the
            if resp.done and not resp.early:  # prompt is read, and can die while it reads one
                raise UpstreamError("upstream ended the stream before its first event",
                                    code="upstream_closed")
        else:
            data = await resp.read_all()  # a whole answer before any byte goes out
            encoding = content_encoding(resp)
            if resp.framing == "close" and status == 200 and (
                    encoding in _IDENTITY or encoding in _ZLIB_WBITS):
                # The end is the close: a death looks like an end, unless the JSON (or its
                # gzip) is cut short. One llmhost cannot decode is relayed.
                try:
                    json_loads(decode_content(data, encoding))
                except ValueError:
                    raise UpstreamError("upstream closed the connection mid-answer",
                                        code="upstream_closed") from None
            if status == 500 and _INPUT_REFUSED.search(data, 0, 4000):
                # llama.cpp answers an input its model cannot read (an image for a text-only
                # model) with a 500: the request's fault, not the server's, which must not
                # cool down (a client's retries would cool it for everyone)
                resp.status, health = 400, "ok"
                data = json_bytes({"error": {
                    "message": upstream_error_message(500, data)[0],
                    "type": "invalid_request_error", "param": "messages",
                    "code": "unsupported_input"}})
        # (marked once it is at hand: one that dies on the way is a failure, not a success)
        self.mark(up, health, f"HTTP {status}", resp.headers.get("retry-after"))
        return resp, data

    async def complete(self, request, body, candidates, native=None):
        """One non-streamed chat completion through the router -> (status, body bytes, the
        Retry-After of a refusal or None); or a native relay's Relayed."""
        async def deliver(up, resp, data, overhead):
            data = data if data is not None else await resp.read_all()
            return (resp.status, decode_content(data, content_encoding(resp)),
                    resp.headers.get("retry-after"))
        return await self.send(request, body, candidates, "/chat/completions", None, deliver,
                               native)


# =============================================================================
# Tool loop
# =============================================================================
# Owns: the MCP tool loop, once for every API: rounds against a chat-completions upstream
# (streamed when the client streams, whole otherwise), the MCP calls each round asks for, one
# stop rule and one round limit; what happens is told to a renderer as neutral events.
# Raises: HTTPError subclasses (an upstream death mid-round is an UpstreamError: the face's
# fail() ends a stream with its API's error event).
# Never: writes to the client (the renderer does) nor knows which API the client speaks.
#
# The renderer's events, in order:
#   tools(bindings)             the MCP tools offered (again after a round changed a list)
#   opened(up)                  the first streamed round's upstream answered: a stream may begin
#   delta(doc, text, reasoning) a chunk a client would show (the upstream's chat chunk, its
#                               tool calls taken out, its id the first round's; and its text)
#   calls(calls) / results(calls, results)   MCP calls about to run, and what they gave
#   waiting()                   tools still running (a stream's keep-alive)
#   refused(status, body, retry_after)       an answer that ends the loop: an error, or a 200
#                               that is no chat completion (passed on as it came); -> keep-alive
#   finished(end)               the loop's end (a LoopEnd); -> keep-alive
#   approval(end, calls)        the loop's end instead, when MCP calls of the last round need the
#                               client's approval (needs_approval): they are not run; -> keep-alive
# and what the loop asks of it:
#   needs_approval(binding)     whether an MCP call of this tool waits for the client (chat: never)
#   approved()                  [(call, tool message)]: calls the client approved after an earlier
#                               answer asked; run before the first round, each result written into
#                               the tool message the face reserved for it in the conversation


class Render:
    """The events of a tool loop, each ignored unless a face's renderer says otherwise;
    `stream`: the loop's rounds are streamed (the client streams)."""

    stream = False

    def tools(self, bindings):
        pass

    def opened(self, up):
        pass

    def delta(self, doc, text, reasoning):
        pass

    def calls(self, calls):
        pass

    def results(self, calls, results):
        pass

    def waiting(self):
        pass

    def refused(self, status, body, retry_after):
        raise NotImplementedError

    def finished(self, end):
        raise NotImplementedError

    def approval(self, end, calls):
        raise NotImplementedError

    def needs_approval(self, binding):
        return False

    def approved(self):
        return ()


ROUND_SEPARATOR = "\n\n"  # between the texts of a tool loop's rounds, in the one answer

# The C scanner that json.loads ends in, called without loads()' and decode()'s Python steps:
# they were half the cost of decoding a token's chunk, which a streamed round does per event.
_SCAN_JSON = json.scanner.make_scanner(json.JSONDecoder())


def event_json(data):
    """An upstream SSE event's data as JSON: what json_loads(data) gives, and raises (anything
    the scanner does not take whole, as whitespace around it, goes through json_loads)."""
    try:
        doc, end = _SCAN_JSON(data, 0)
    except (StopIteration, ValueError, RecursionError):
        return json_loads(data)
    return doc if end == len(data) else json_loads(data)


class LoopEnd:
    """How a tool loop ended, for the renderer: the last round's answer (`doc`, `message` of a
    whole one; `template`, its last chunk, of a stream), every round's text, the calls for the
    client's own tools it ended on, whether the rounds ran out, usage and the MCP call report."""

    def __init__(self, state, last_round, texts, client_calls, exhausted):
        self.doc = last_round.doc
        self.message = last_round.message
        self.template = last_round.template
        self.finish = last_round.finish
        self.texts = texts
        self.client_calls = client_calls
        self.exhausted = exhausted
        self.usage = state["usage"]
        self.report = state["report"]

    def text(self):
        """The answer's text: every round's, set apart by a blank line ("Let me check.")."""
        texts = [text for text in self.texts if isinstance(text, str) and text]
        return ROUND_SEPARATOR.join(texts) if texts else None

    def finish_reason(self):
        if self.exhausted:
            return "stop"  # out of rounds: the answer is what the model has, and we say so
        return "tool_calls" if self.client_calls else self.finish or "stop"


class Round:
    """One round's answer as it comes: its chunks (absorb) or its whole answer (take)."""

    def __init__(self, number, shown_before, usage, template):
        self.number = number
        self.shown_before = shown_before  # an earlier round's text was shown: set this apart
        self.usage = usage
        self.calls = {}  # index -> the call, assembled from its pieces
        self.finish = None
        self.content = []
        self.doc = self.message = None
        self.template = template  # the last chunk with choices (a stream's end is made of it)

    def text(self):
        if self.message is not None:
            return self.message.get("content")
        return "".join(self.content) or None

    def tool_calls(self):
        if self.message is not None:
            return self.message.get("tool_calls") or []
        return [self.calls[i] for i in sorted(self.calls)]

    def take(self, doc, message, add_usage):
        """A whole answer (a round not streamed)."""
        self.doc, self.message = doc, message
        self.finish = doc["choices"][0].get("finish_reason")
        add_usage(self.usage, doc.get("usage"))

    def absorb(self, doc, add_usage):
        """Take in one chunk: note its tool calls and text -> the chunk as a client would see
        it (tool calls out, no finish yet), or None if it shows nothing."""
        if not isinstance(doc, dict):
            raise UpstreamError("upstream sent an event that is not a JSON object")
        choices = doc.get("choices")
        if choices.__class__ is list and len(choices) == 1 and not doc.get("error") and \
                not doc.get("usage"):  # (the chunk most of a stream is: read at once)
            choice = choices[0]
            delta = choice.get("delta") if choice.__class__ is dict else None
            content = delta.get("content") if delta.__class__ is dict else None
            if content and content.__class__ is str and "tool_calls" not in delta and \
                    (self.content or not self.shown_before):
                # a token's text, and no call: what the loop below makes of it, in short
                self.template = doc
                finish = choice.get("finish_reason")
                if finish:
                    self.finish = finish
                self.content.append(content)
                choice["finish_reason"] = None
                doc.pop("usage", None)
                return doc
        if doc.get("error"):  # ends the stream with our one error event
            error = doc["error"]
            raise UpstreamError("upstream: " + str(error.get("message", error)
                                                   if isinstance(error, dict) else error))
        problem = chunk_problem(doc)
        if problem:
            raise UpstreamError("upstream sent a chunk that is not an OpenAI "
                                f"chat.completion.chunk ({problem})", code="upstream_format")
        usage = doc.get("usage")
        if usage:
            add_usage(self.usage, usage)
        shown = None
        for choice in doc.get("choices") or ():
            self.template = doc
            delta = choice.get("delta") or {}
            calls = delta.pop("tool_calls", None)
            for part in calls or ():
                call = self.calls.setdefault(part.get("index", 0), {
                    "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                call["id"] = part.get("id") or call["id"]
                fn = part.get("function") or {}
                call["function"]["name"] += fn.get("name") or ""
                call["function"]["arguments"] += fn.get("arguments") or ""
            finish = choice.get("finish_reason")
            if finish:
                self.finish = finish
            content = delta.get("content")
            if content:  # (most chunks: a token's text, which a client shows)
                self.content.append(content)
                if self.shown_before and len(self.content) == 1 and \
                        isinstance(content, str):  # (as LoopEnd.text joins them)
                    delta["content"] = ROUND_SEPARATOR + content
            elif not any(v for k, v in delta.items() if k != "role") and \
                    not (self.number == 0 and "role" in delta):
                continue  # nothing a client would show
            choice["finish_reason"] = None
            doc.pop("usage", None)
            shown = doc
        return shown


class ToolLoop:
    """One request's tool loop: run(render) -> what the renderer's finished() or refused()
    returns. `core` gives the send path (`sender`), the MCP hub (`mcp`), `run_mcp_calls` and
    `rebind`; `state` is the conversation and what the request gave (see mcp_rounds)."""

    def __init__(self, core, request, base, bindings, state, stream, native=None):
        self.core = core
        self.request = request
        self.native = native  # a Native: the first round's native relay, if any
        self.base = base  # the request's body, without messages, with the tools offered
        self.bindings = bindings  # tool name -> MCP binding
        self.state = state
        self.stream = stream  # rounds are streamed (the client streams)
        self.stream_id = None  # the first chunk's id, which every chunk then carries

    def round_body(self, number, last):
        body = dict(self.base, messages=self.state["messages"])
        if last and "tools" in body:
            body["tool_choice"] = "none"  # out of rounds: the model must answer now
        elif number and body.get("tool_choice") is not None:
            body["tool_choice"] = unforced(body["tool_choice"])
        if self.stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return body

    async def run(self, render):
        core, state = self.core, self.state
        rounds = core.mcp_max_rounds
        texts = []  # each round's text
        template = None
        render.tools(self.bindings)
        approved = render.approved()
        if approved:
            calls = [call for call, _ in approved]
            for (_, message), result in zip(approved, await self.run_calls(calls, render)):
                message["content"] = result["text"]
        for number in range(rounds + 1):
            last = number == rounds
            current = Round(number, any(texts), state["usage"], template)
            refusal = await self.one_round(current, self.round_body(number, last), render,
                                           self.native if number == 0 else None)
            if isinstance(refusal, Relayed):  # an entry answered in the client's API itself
                return refusal.keep_alive
            if refusal is not None:
                return render.refused(*refusal)
            template = current.template
            texts.append(current.text())
            mine, theirs = core.split_calls(current.tool_calls(), self.bindings,
                                            state["client_names"], number)
            # The one stop rule: no MCP call to run, the rounds ran out, or the model also
            # called a tool of the client's (the client's calls go back to it, llmhost's are
            # not run: the model answers after both, in the client's next request).
            if not mine or last or theirs:
                usage = state["usage"]  # every round's, for /metrics and the access log
                self.request.tokens = {kind: usage[kind + "_tokens"] for kind in (
                    "prompt", "completion") if type(usage.get(kind + "_tokens")) is int}
                self.cork_the_end()
                return render.finished(LoopEnd(state, current, texts,
                                               theirs if not last else None, last))
            # Calls that wait for the client's approval end the loop (the others of the round
            # run first); the client's next request says whether they run (approved()).
            asks = [call for call in mine if render.needs_approval(
                self.bindings.get(call["function"].get("name")))]
            if asks:
                others = [call for call in mine if all(call is not ask for ask in asks)]
                if others:
                    await self.run_calls(others, render)
                self.cork_the_end()
                return render.approval(LoopEnd(state, current, texts, None, False), asks)
            results = await self.run_calls(mine, render)
            core.extend_conversation(state, current.message or {
                "role": "assistant", "content": current.text()}, mine, results)
            if await core.rebind(state, self.base, self.bindings):
                render.tools(self.bindings)

    def cork_the_end(self):
        """A stream's closing events (an item's .done events, the final chunk or event) go out
        in one write with its end (end_stream uncorks), not one write each."""
        if self.stream:
            self.request.conn.cork()

    async def run_calls(self, calls, render):
        """Run MCP calls, telling the renderer -> their results."""
        state = self.state
        render.calls(calls)
        results = await self.core.run_mcp_calls(self.request, calls, self.bindings,
                                                state["report"], state["client_names"],
                                                tick=render.waiting)
        render.results(calls, results)
        return results

    async def one_round(self, current, body, render, native=None):
        """Ask the model once -> None, or the (status, body, retry_after) that ends the loop,
        or Relayed when an entry took the request natively (`native`) and has answered it."""
        core = self.core
        candidates = core.router.resolve(self.base["model"])  # each round ordered anew
        if not self.stream:
            answer = await core.sender.complete(self.request, body, candidates, native)
            if isinstance(answer, Relayed):
                return answer
            status, data, retry_after = answer
            doc, message = completion_message(data) if status == 200 else (None, None)
            if message is None:
                return status, data, retry_after
            current.take(doc, message, core.add_usage)
            return None

        async def deliver(up, resp, data, overhead):
            encoding = content_encoding(resp)
            content = None
            if data is not None:  # a whole answer, though a stream was asked for
                data = decode_content(data, encoding)
                doc, message = completion_message(data) if resp.status == 200 else (None, None)
                if message is None:
                    return resp.status, data, resp.headers.get("retry-after")
            else:  # (one llmhost cannot decode fails before any byte of it goes out)
                content = content_decoder(encoding)
            # What the renderer makes of one upstream read goes out in one write (uncork()
            # before each wait), not one write per event.
            conn = self.request.conn
            conn.cork()
            try:
                render.opened(up)
                if data is not None:  # some servers ignore "stream": one chunk of it all
                    self.show(current, completion_as_chunk(doc, message), render)
                    return None
                decoder = SSEDecoder()
                done = False
                while True:
                    conn.uncork()
                    chunk = await (resp.read_some() if content is None else
                                   read_decoded(resp, content))
                    conn.cork()
                    if not chunk:
                        error = cut_short(resp, done)
                        if error is not None:
                            core.router.failed(up, error.message)  # (as relay_stream)
                            raise error
                        return None
                    for event in decoder.feed(chunk):
                        if event == "[DONE]":
                            done = True
                            continue
                        try:
                            doc = event_json(event)
                        except ValueError:
                            raise UpstreamError("upstream sent an event that is not JSON: "
                                                f"{event[:200]!r}") from None
                        self.show(current, doc, render)
            finally:
                conn.uncork()

        return await core.sender.send(self.request, body, candidates, "/chat/completions",
                                      None, deliver, native)

    def show(self, current, doc, render):
        if isinstance(doc, dict):  # every round's chunks carry the first's id: one completion
            if self.stream_id is None:
                self.stream_id = doc.get("id")
            elif "id" in doc:
                doc["id"] = self.stream_id
        shown = current.absorb(doc, self.core.add_usage)
        if shown is not None:
            delta = shown["choices"][0].get("delta") or {}
            render.delta(shown, delta.get("content"), delta.get("reasoning_content"))


# =============================================================================
# Metrics
# =============================================================================
# Owns: GET /metrics, the Prometheus text exposition format (version 0.0.4): the request
# counters and histograms kept here, and, read only at a scrape, the counters other sections
# keep where their events happen (Admission.rejected, Upstream.requests/errors/cooldowns,
# Sender.failures) and the process's own figures (/proc, as Prometheus' process collector
# names them).
# Never: costs a request more than a few dict updates (names, labels and text are made at a
# scrape); takes a label from a client's free text (a model the router does not serve is
# "unknown", a path no route serves is "other").

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# s; Prometheus' default buckets, stretched to the minutes a long generation takes
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0)
# a usage field and its number (the Responses and Messages names too: their answers are
# relayed from a "native" entry); one findall over the usage object costs half what a find
# of each name does
_USAGE_FIELD = re.compile(rb'"(prompt|completion|input|output)_tokens"\s*:\s*(\d+)')
_USAGE_KINDS = {b"prompt": "prompt", b"input": "prompt", b"completion": "completion",
                b"output": "completion"}


def prometheus_label(value):
    """A label value as the text format writes it (backslash, quote and line feed escaped)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Histogram:
    """Fixed buckets: observe() adds to one slot; the cumulative counts are made at a scrape."""
    __slots__ = ("counts", "sum")

    def __init__(self):
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)  # the last one: +Inf only
        self.sum = 0.0

    def observe(self, value):
        self.counts[bisect_left(DURATION_BUCKETS, value)] += 1
        self.sum += value

    def lines(self, name, labels):
        return histogram_lines(name, labels, self.counts, self.sum)


def histogram_lines(name, labels, counts, total_sum):
    """A histogram's series in the text format: cumulative buckets, +Inf, sum, count."""
    out = []
    total = 0
    sep = "," if labels else ""
    for bound, count in zip((*DURATION_BUCKETS, "+Inf"), counts):
        total += count
        out.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {total}')
    braces = "{%s}" % labels if labels else ""
    out.append(f"{name}_sum{braces} {total_sum!r}")
    out.append(f"{name}_count{braces} {total}")
    return out


def process_figures():
    """-> [(name, type, help, value)] of this process, where the platform tells (Linux /proc;
    elsewhere only CPU seconds)."""
    times = os.times()
    figures = [("process_cpu_seconds_total", "counter", "User and system CPU time spent in seconds.",
                times.user + times.system)]
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/statm") as f:
            vsize, rss = f.read().split()[:2]
        figures.append(("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.",
                        int(rss) * page))
        figures.append(("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.",
                        int(vsize) * page))
        figures.append(("process_open_fds", "gauge", "Number of open file descriptors.",
                        len(os.listdir("/proc/self/fd"))))
        with open("/proc/self/stat") as f:  # field 22, counted after the ')' that ends comm
            start_ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        figures.append(("process_start_time_seconds", "gauge",
                        "Start time of the process since unix epoch in seconds.",
                        boot + start_ticks / os.sysconf("SC_CLK_TCK")))
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    try:
        import resource
        figures.append(("process_max_fds", "gauge", "Maximum number of open file descriptors.",
                        resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
    except (ImportError, OSError, ValueError):
        pass
    return figures


class Metrics:
    """The counters of one Application, and their exposition."""

    def __init__(self, app):
        self.app = app  # its router, admission, sender and processes are read at a scrape
        self.requests = {}  # (route, model, status) -> answers
        self.durations = {}  # (route, model) -> Histogram of seconds from head to last byte
        self.tokens = {}  # (model, "prompt" | "completion") -> tokens from upstream usage
        self.first_bytes = {}  # (route, model) -> Histogram of a stream's first event's time
        self.mcp = {}  # (server, tool, outcome) -> MCP tool calls llmhost ran
        self.mcp_durations = {}  # (server, tool) -> Histogram of their seconds
        self.paths = {}  # request path -> route label (bounded: a client may send any path)
        self.shared = None  # --workers: the folder where every worker publishes its figures
        self.next_publish = 0.0

    def route_of(self, path):
        label = self.paths.get(path)
        if label is None:
            routes = self.app.routes
            if path in routes:
                label = path
            elif "/v1" + path in routes and not path.startswith("/v1/"):
                label = "/v1" + path
            else:
                label = next((prefix for prefix, _ in self.app.prefix_routes
                              if path.startswith(prefix)), "other")
            if len(self.paths) < METRICS_PATHS_MAX:
                self.paths[path] = label
        return label

    def labels_of(self, request):
        """A request's (route, model) labels, found once (kept on it: a stream needs them at
        its first event and at its end)."""
        route = self.paths.get(request.path) or self.route_of(request.path)
        model = request.model
        if model is None:
            model = ""
        elif model.__class__ is not str or model not in self.app.router.table:
            model = "unknown"
        labels = request.labels = (route, model)
        return labels

    def answered(self, request, status, now):
        """One request's end (each answer, by status; 499 when the client left)."""
        labels = request.labels or self.labels_of(request)
        key = (*labels, status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        if request.tokens:  # (usage() or the tool loop read them)
            tokens = self.tokens
            model = labels[1]
            for kind, value in request.tokens.items():
                key = (model, kind)
                tokens[key] = tokens.get(key, 0) + value
        hist = self.durations.get(labels)
        if hist is None:
            hist = self.durations[labels] = Histogram()
        seconds = now - request.started  # (Histogram.observe, inlined: once per request)
        hist.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        hist.sum += seconds

    def stream_opened(self, request, now):
        """A relayed stream's head and first event go out now (the upstream's first event:
        a token, or the role chunk that comes with the first token's time on most servers)."""
        labels = request.labels or self.labels_of(request)
        hist = self.first_bytes.get(labels)
        if hist is None:
            hist = self.first_bytes[labels] = Histogram()
        request.first_byte = seconds = now - request.started
        hist.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        hist.sum += seconds

    def mcp_calls(self, entries, registered):
        """A round's MCP calls (their mcp_calls entries). A server a request named by URL is
        "adhoc" and so are its tools (the client chose both); a tool the model made up is
        server "none", tool "unknown"."""
        for entry in entries:
            server, tool = entry["server"], entry["tool"]
            if server is None:
                server, tool = "none", "unknown"
            elif server not in registered:
                server = tool = "adhoc"
            key = (server, tool, "ok" if entry["ok"] else "error")
            self.mcp[key] = self.mcp.get(key, 0) + 1
            hist = self.mcp_durations.get(key[:2])
            if hist is None:
                hist = self.mcp_durations[key[:2]] = Histogram()
            hist.observe((entry["duration_ms"] or 0.0) / 1000)

    @staticmethod
    def usage(request, body):
        """The `usage` of a whole JSON answer llmhost relays -> request.tokens (counted with
        the request, in answered()): the field is found from the end (where servers put it)
        and only its numbers are read, not the whole document."""
        at = body.rfind(b'"usage"')
        if at < 0:
            return
        found = request.tokens = {}
        for name, number in _USAGE_FIELD.findall(body, at, at + 440):
            kind = _USAGE_KINDS[name]
            if kind not in found:  # (the first of each, as the fields come)
                found[kind] = int(number)

    def collect(self):
        """-> [[name, type, help, merge, {label text: value}]], what one process has counted
        (a histogram's value: its bucket counts, then its sum). `merge` says how the figures
        of --workers' processes add up: "sum"; "live" (a sum over running workers only: a
        gauge); "max"; "min"."""
        app = self.app

        def labels(**pairs):
            return ",".join(f'{k}="{prometheus_label(v)}"' for k, v in pairs.items())

        def hists(table, *names):
            return {labels(**dict(zip(names, key))): [*hist.counts, hist.sum]
                    for key, hist in table.items()}

        adm = app.admission
        ups = app.router.upstreams.values()
        now = app.router.clock()
        out = [
            ["llmhost_build_info", "gauge", "llmhost's version and Python's; always 1.", "max",
             {labels(version=__version__, python="%d.%d.%d" % sys.version_info[:3]): 1}],
            ["llmhost_requests_total", "counter",
             "Requests answered, by route, model and status (499: the client left).", "sum",
             {labels(route=r, model=m, status=s): n for (r, m, s), n in self.requests.items()}],
            ["llmhost_request_duration_seconds", "histogram",
             "Time from a request's head to its answer's end.", "sum",
             hists(self.durations, "route", "model")],
            ["llmhost_stream_first_byte_seconds", "histogram",
             "Time from a streamed request's head to its first event going out.", "sum",
             hists(self.first_bytes, "route", "model")],
            ["llmhost_tokens_total", "counter",
             "Tokens in the usage of the upstream answers llmhost read, by model and kind.",
             "sum", {labels(model=m, kind=k): n for (m, k), n in self.tokens.items()}],
            ["llmhost_in_flight_requests", "gauge", "Requests holding a concurrency slot.",
             "live", {"": adm.active}],
            ["llmhost_queued_requests", "gauge", "Requests waiting for a slot or a server.",
             "live", {"": adm.queued()}],
            ["llmhost_refused_requests_total", "counter",
             "Requests refused with 429 (queue full or waited too long).", "sum",
             {"": adm.rejected}],
            ["llmhost_upstream_attempts_total", "counter",
             "Requests sent to each server (a retry on another server counts there too).",
             "sum", {labels(server=up.name): up.requests for up in ups}],
            ["llmhost_upstream_failures_total", "counter",
             "Failed attempts by server and kind (the upstream error's code, http_429, "
             "http_5xx, start_failed).", "sum",
             {labels(server=s, kind=k): n for (s, k), n in app.sender.failures.items()}],
            ["llmhost_upstream_cooldowns_total", "counter", "Cooldowns each server entered.",
             "sum", {labels(server=up.name): up.cooldowns for up in ups}],
            # (each worker keeps its own health: a server cools where it failed)
            ["llmhost_upstream_cooling", "gauge",
             "1 while a server is cooling down (in any worker), else 0.", "live_max",
             {labels(server=up.name): int(up.cooldown_until > now) for up in ups}],
            ["llmhost_upstream_in_flight_requests", "gauge", "Requests at each server now.",
             "live", {labels(server=up.name): up.in_flight for up in ups}],
            ["llmhost_mcp_calls_total", "counter",
             "MCP tool calls llmhost ran, by server, tool and outcome (ok, error).", "sum",
             {labels(server=s, tool=t, outcome=o): n for (s, t, o), n in self.mcp.items()}],
            ["llmhost_mcp_call_duration_seconds", "histogram", "Time of each MCP tool call.",
             "sum", hists(self.mcp_durations, "server", "tool")],
        ]
        processes = app.processes
        if processes is not None and processes.servers:
            managed = processes.servers.values()
            out.append(["llmhost_managed_servers_running", "gauge",
                        "Managed servers whose process is running.", "live",
                        {"": sum(1 for m in managed if m.state == "running")}])
            out.append(["llmhost_managed_server_transitions_total", "counter",
                        "Moves of each managed server into a state: running (a start), failed "
                        "(a start that failed or a crash), stopped.", "sum",
                        {labels(server=m.name, state=st): n for m in managed
                         for st, n in m.entered.items()}])
        merges = {"process_cpu_seconds_total": "sum", "process_start_time_seconds": "min",
                  "process_max_fds": "max"}  # (the rest: gauges of running processes)
        for name, kind, text, value in process_figures():
            out.append([name, kind, text, merges.get(name, "live"), {"": value}])
        return out

    def publish(self, _now=None, force=False):
        """Under --workers: write this worker's figures where the others read them at a
        scrape (`shared`, a folder serve made; one file per process, replaced whole)."""
        if self.shared is None or time.monotonic() < self.next_publish and not force:
            return
        self.next_publish = time.monotonic() + METRICS_PUBLISH_INTERVAL
        path = os.path.join(self.shared, "%d.json" % os.getpid())
        try:
            with open(path + ".tmp", "w") as f:
                f.write(json.dumps(self.collect()))
            os.replace(path + ".tmp", path)
        except OSError:
            pass  # (the scrape then totals without this worker's latest second)

    def others(self):
        """-> [(alive, families)] of the other workers' last published figures; a worker that
        died is still there, so the totals never go down when one is replaced."""
        found = []
        try:
            names = os.listdir(self.shared)
        except OSError:
            return found
        for name in names:
            pid = name[:-5]
            if not name.endswith(".json") or not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                with open(os.path.join(self.shared, name)) as f:
                    families = json.loads(f.read())
            except (OSError, ValueError):
                continue
            try:
                os.kill(int(pid), 0)
                alive = True
            except ProcessLookupError:
                alive = False
            except OSError:  # (EPERM: it exists)
                alive = True
            found.append((alive, families))
        return found

    def render(self):
        families = self.collect()
        if self.shared is not None:
            totals = {f[0]: f for f in families}
            for alive, theirs in self.others():
                for name, kind, text, merge, samples in theirs:
                    if not alive and merge.startswith("live"):
                        continue
                    mine = totals.get(name)
                    if mine is None:
                        mine = totals[name] = [name, kind, text, merge, {}]
                        families.append(mine)
                    into = mine[4]
                    for key, value in samples.items():
                        if key not in into:
                            into[key] = value
                        elif isinstance(value, list):
                            into[key] = [a + b for a, b in zip(into[key], value)]
                        elif merge in ("max", "live_max"):
                            into[key] = max(into[key], value)
                        elif merge == "min":
                            into[key] = min(into[key], value)
                        else:
                            into[key] = into[key] + value
        out = []
        for name, kind, text, _, samples in families:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")
            for key in sorted(samples):
                value = samples[key]
                if kind == "histogram":
                    out.extend(histogram_lines(name, key, value[:-1], value[-1]))
                else:
                    out.append(f"{name}{{{key}}} {value}" if key else f"{name} {value}")
        out.append("")
        return "\n".join(out).encode()

# =============================================================================
# Messages API
# =============================================================================
# Owns: Anthropic's Messages API as a face: a request (POST /v1/messages, /count_tokens) read
# into a chat-completions body, the tool loop's events rendered as a Message or as its stream
# of named events, its error envelope and types, and the count_tokens estimate.
# Raises: BadRequest for a request of another shape (shown in Anthropic's envelope: the
# routes' face is MESSAGES_FACE).
# Never: sends anything upstream itself (Application.messages runs the body through the tool
# loop), nor refuses a field Claude Code sends that it cannot honour: it is left out.

# HTTP status -> Anthropic's error type (their "HTTP errors" page); others by class.
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                         403: "permission_error", 404: "not_found_error",
                         413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                         502: "api_error", 503: "overloaded_error", 504: "timeout_error",
                         529: "overloaded_error"}
ANTHROPIC_VERSION = "2023-06-01"  # the anthropic-version the SDKs send, for a client without one
# chat finish_reason -> Messages stop_reason (a stop string is told apart in stop_reason())
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "function_call": "tool_use", "content_filter": "refusal"}


def anthropic_error(status, message):
    """Anthropic's error envelope for an answer of `status`."""
    kind = ANTHROPIC_ERROR_TYPES.get(status) or (
        "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def named_event(name, doc):
    """One SSE event with its name: Anthropic's clients skip an event without one."""
    return b"event: " + name.encode() + b"\n" + sse_event(doc)


class MessagesFace(Face):
    """The Messages routes' errors: Anthropic's envelope, and its `error` event to end a stream
    that failed after its head went out."""

    def error_body(self, exc):
        return json_bytes(anthropic_error(exc.status, exc.message))

    def error_event(self, exc):
        return named_event("error", anthropic_error(exc.status, exc.message))

    def upstream_error(self, status, body):
        """An error body of Anthropic's shape passes as it is; another (OpenAI's envelope, as
        llama.cpp's /v1/messages answers) is told in Anthropic's."""
        try:
            doc = json_loads(body)
        except (ValueError, UnicodeDecodeError):
            doc = None
        if isinstance(doc, dict) and doc.get("type") == "error" and isinstance(
                doc.get("error"), dict) and isinstance(doc["error"].get("type"), str):
            return body
        return json_bytes(anthropic_error(status, "upstream: " + upstream_error_message(
            status, body)[0]))

    def stream_ended(self, data):
        return b"message_stop" in data

    def native_fields(self, headers):
        """The client's anthropic-version (which Anthropic's API requires: the SDKs' own when
        a client sent none) and anthropic-beta."""
        return "anthropic-version: %s\r\n%s" % (
            headers.get("anthropic-version", ANTHROPIC_VERSION),
            "anthropic-beta: %s\r\n" % headers["anthropic-beta"]
            if "anthropic-beta" in headers else "")


MESSAGES_FACE = MessagesFace()


def messages_problem(where, message):
    return BadRequest(f"{where}: {message}", param=where)


def blocks_text(content, where):
    """The text of `content`, a string or a list of blocks: text blocks, a document's text and
    a search result's (images and others are left out)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise messages_problem(where, "expected a string or a list of content blocks, "
                               f"got {json_kind(content)}")
    texts = []
    for i, block in enumerate(content):
        if not isinstance(block, dict):
            raise messages_problem(f"{where}[{i}]", "expected a content block (an object)")
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind in ("document", "search_result"):
            text = document_text(block)
            if text:
                texts.append(text)
    return "\n\n".join(texts)


def document_text(block):
    """A document's (plain text or content blocks) or search result's text; "" for others (a
    PDF: chat completions have no way to give one)."""
    source = block.get("source")
    if block.get("type") == "search_result":
        source = {"type": "content", "content": block.get("content")}
    if not isinstance(source, dict):
        return ""
    if source.get("type") == "text" and isinstance(source.get("data"), str):
        text = source["data"]
    elif source.get("type") == "content" and isinstance(source.get("content"), (str, list)):
        content = source["content"]
        text = content if isinstance(content, str) else "\n\n".join(
            b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str))
    else:
        return ""
    title = block.get("title")
    return f"{title}\n\n{text}" if isinstance(title, str) and title else text


def image_part(block, where):
    """An image block as a chat image_url part (base64 as a data URL, or the URL)."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source.get("data"), str) and \
            isinstance(source.get("media_type"), str):
        url = f"data:{source['media_type']};base64,{source['data']}"
    elif kind == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise messages_problem(f"{where}.source", "expected a base64 source (media_type, data) "
                               "or a url source; llmhost has no Files API")
    return {"type": "image_url", "image_url": {"url": url}}


def tool_result_messages(block, where):
    """A tool_result block -> its tool message, and the image parts it held (tool messages are
    text only: the images follow in the user message)."""
    content = block.get("content")
    images = []
    if isinstance(content, list):
        images = [image_part(b, f"{where}.content[{i}]") for i, b in enumerate(content)
                  if isinstance(b, dict) and b.get("type") == "image"]
    text = blocks_text(content, f"{where}.content") if content is not None else ""
    if block.get("is_error") is True:
        text = f"Error: {text}" if text else "Error"
    tool_use_id = block.get("tool_use_id")
    if not isinstance(tool_use_id, str):
        raise messages_problem(f"{where}.tool_use_id", "expected a string")
    return {"role": "tool", "tool_call_id": tool_use_id, "content": text}, images


def user_messages(blocks, where):
    """A user turn's blocks -> its tool messages (tool_result blocks, first, as chat wants them
    right after the assistant's calls), then one user message with the rest, if any."""
    tools, parts = [], []
    for i, block in enumerate(blocks):
        at = f"{where}[{i}]"
        if not isinstance(block, dict):
            raise messages_problem(at, "expected a content block (an object)")
        kind = block.get("type")
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise messages_problem(f"{at}.text", "expected a string")
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            parts.append(image_part(block, at))
        elif kind == "tool_result":
            message, images = tool_result_messages(block, at)
            tools.append(message)
            parts.extend(images)
        elif kind in ("document", "search_result"):
            text = document_text(block)
            if text:
                parts.append({"type": "text", "text": text})
    if not parts:
        return tools
    if len(parts) == 1 and parts[0]["type"] == "text":
        return tools + [{"role": "user", "content": parts[0]["text"]}]
    return tools + [{"role": "user", "content": parts}]


def tool_arguments(value, where):
    if not isinstance(value, dict):
        raise messages_problem(where, "expected an object")
    return json_bytes(value).decode()


def assistant_messages(blocks, where):
    """An assistant turn's blocks -> chat messages: its text and tool_use calls as one; the
    mcp_tool_use / mcp_tool_result blocks of an earlier answer replayed as the calls llmhost
    ran and their tool messages (text after them is a message of its own, as it was a round of
    its own). Thinking blocks are left out: chat has no way to give them back."""
    out, texts, calls = [], [], []

    def flush():
        if texts or calls:
            message = {"role": "assistant", "content": "".join(texts) or None}
            if calls:
                message["tool_calls"] = list(calls)
            out.append(message)
        texts.clear()
        calls.clear()

    for i, block in enumerate(blocks):
        at = f"{where}[{i}]"
        if not isinstance(block, dict):
            raise messages_problem(at, "expected a content block (an object)")
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind in ("tool_use", "mcp_tool_use"):
            name, call_id = block.get("name"), block.get("id")
            if not isinstance(name, str) or not isinstance(call_id, str):
                raise messages_problem(at, "a tool_use needs a string id and name")
            if kind == "mcp_tool_use":
                name = mcp_tool_name(str(block.get("server_name")), name, set())
            calls.append({"id": call_id, "type": "function", "function": {
                "name": name, "arguments": tool_arguments(block.get("input", {}),
                                                          f"{at}.input")}})
        elif kind == "mcp_tool_result":
            flush()
            out.append(tool_result_messages(block, at)[0])
    flush()
    return out


def function_tools(tools):
    """Messages tools -> chat function tools. Tools without an input_schema (Anthropic's own
    server tools, web_search, code_execution..., which llmhost cannot run) are left out;
    cache_control, defer_loading and the like are not for the model."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise messages_problem("tools", "expected a list")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise messages_problem(f"tools[{i}]", "expected an object")
        if tool.get("type") not in (None, "custom") or "input_schema" not in tool:
            continue
        if not isinstance(tool.get("name"), str) or not isinstance(tool["input_schema"], dict):
            raise messages_problem(f"tools[{i}]", "a tool needs a string name and an "
                                   "input_schema object")
        function = {"name": tool["name"], "parameters": tool["input_schema"]}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice):
    """Messages tool_choice -> (chat tool_choice, parallel_tool_calls), None where unsaid."""
    if choice is None:
        return None, None
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool" and isinstance(choice.get("name"), str):
        chat = {"type": "function", "function": {"name": choice["name"]}}
    elif kind in ("auto", "any", "none"):
        chat = {"auto": "auto", "any": "required", "none": "none"}[kind]
    else:
        raise messages_problem("tool_choice", "expected {\"type\": \"auto\" | \"any\" | "
                               "\"none\"} or {\"type\": \"tool\", \"name\": NAME}")
    return chat, (False if choice.get("disable_parallel_tool_use") is True else None)


def mcp_server_tools(servers, tools):
    """The `mcp_servers` request parameter (and `mcp_toolset` tools, the newer beta's way to
    choose a server's tools) -> chat tools of type "mcp", which mcp_selection() reads under the
    same rules as chat's: a url only under --mcp-allow-url; a name without url names an MCP
    server registered in llmhost."""
    if servers is None:
        return []
    if not isinstance(servers, list):
        raise messages_problem("mcp_servers", "expected a list")
    toolsets = {t.get("mcp_server_name"): t for t in tools or ()
                if isinstance(t, dict) and t.get("type") == "mcp_toolset"}
    out = []
    for i, server in enumerate(servers):
        where = f"mcp_servers[{i}]"
        if not isinstance(server, dict) or not isinstance(server.get("name"), str):
            raise messages_problem(where, "expected an object with a string name")
        if server.get("type", "url") != "url":
            raise messages_problem(f"{where}.type", "expected 'url'")
        config = server.get("tool_configuration") or {}
        allowed = config.get("allowed_tools") if isinstance(config, dict) else None
        if allowed is not None and (not isinstance(allowed, list) or
                                    not all(isinstance(name, str) for name in allowed)):
            raise messages_problem(f"{where}.tool_configuration.allowed_tools",
                                   "expected a list of tool names")
        if isinstance(config, dict) and config.get("enabled") is False:
            continue
        toolset = toolsets.get(server["name"])
        if isinstance(toolset, dict):
            default = (toolset.get("default_config") or {}).get("enabled", True)
            configs = toolset.get("configs") or {}
            if default is not False and any(isinstance(c, dict) and c.get("enabled") is False
                                            for c in configs.values()):
                raise messages_problem(f"tools (mcp_toolset {server['name']})", "llmhost "
                                       "cannot leave single tools out: set default_config."
                                       "enabled to false and enable the tools to offer in "
                                       "configs")
            if default is False:
                allowed = [name for name, c in configs.items()
                           if isinstance(c, dict) and c.get("enabled") is True]
                if not allowed:
                    continue
        tool = {"type": "mcp", "server_label": server["name"], "require_approval": "never"}
        if server.get("url") is not None:
            tool["server_url"] = server["url"]
        token = server.get("authorization_token")
        if isinstance(token, str) and token:
            tool["headers"] = {"Authorization": f"Bearer {token}"}
        if allowed is not None:
            tool["allowed_tools"] = list(allowed)
        out.append(tool)
    return out


def messages_as_chat(body, count_only=False):
    """A Messages request (parse_json_body's, kind "messages") -> its chat-completions body.
    System text (`system`, and system-role messages inside `messages`, as Claude Code sends)
    is one system message first: many chat templates take none elsewhere."""
    if not count_only and body.get("max_tokens") is None:
        raise BadRequest("max_tokens: Field required", param="max_tokens",
                         code="missing_required_parameter")
    system = [] if body.get("system") is None else [blocks_text(body["system"], "system")]
    messages = []
    for i, message in enumerate(body["messages"]):
        where = f"messages[{i}]"
        role, content = message.get("role"), message.get("content")
        if role == "system":
            system.append(blocks_text(content, f"{where}.content"))
            continue
        if role not in ("user", "assistant"):
            raise messages_problem(f"{where}.role", "expected 'user' or 'assistant'")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
        elif isinstance(content, list):
            messages.extend((user_messages if role == "user" else assistant_messages)(
                content, f"{where}.content"))
        else:
            raise messages_problem(f"{where}.content", "expected a string or a list of "
                                   "content blocks")
    system = [text for text in system if text]
    chat = {"model": body["model"], "messages": (
        [{"role": "system", "content": "\n\n".join(system)}] if system else []) + messages}
    if not count_only:
        chat["max_tokens"] = body["max_tokens"]
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise messages_problem("stop_sequences", "expected a list of strings")
        if stops:
            chat["stop"] = stops
    for field in ("temperature", "top_p", "top_k"):
        if body.get(field) is not None:
            chat[field] = body[field]
    tools = function_tools(body.get("tools")) + mcp_server_tools(body.get("mcp_servers"),
                                                                 body.get("tools"))
    if tools:
        chat["tools"] = tools
    choice, parallel = chat_tool_choice(body.get("tool_choice"))
    if choice is not None:
        chat["tool_choice"] = choice
    if parallel is not None:
        chat["parallel_tool_calls"] = parallel
    return chat


def anthropic_usage(usage):
    usage = usage or {}
    return {"input_tokens": usage.get("prompt_tokens", 0),
            "output_tokens": usage.get("completion_tokens", 0),
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


def stop_reason(end, stops):
    """-> (stop_reason, stop_sequence) of a loop's end. A stop string is named where the
    upstream says which one ended the answer (vLLM: the choice's `stop_reason`); else it is an
    end_turn, as the text alone cannot tell a stop string from the model's own end."""
    if end.exhausted:
        return "end_turn", None
    finish = end.finish_reason()
    last = end.doc if end.doc is not None else end.template
    choices = last.get("choices") if isinstance(last, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices and \
        isinstance(choices[0], dict) else {}
    matched = choice.get("stop_reason")
    if finish == "stop" and isinstance(matched, str) and matched in (stops or ()):
        return "stop_sequence", matched
    return STOP_REASONS.get(finish, "end_turn"), None


def parsed_input(call):
    """A chat call's arguments as a tool_use block's input object; arguments that are no JSON
    object (a small model's slip) are given whole, under "_arguments", for the client to refuse."""
    arguments = call["function"].get("arguments") or "{}"
    try:
        value = json_loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"_arguments": arguments}


def rounds_note(rounds):
    return f"[llmhost: stopped after {rounds} rounds of MCP tool calls]"


class MessagesRender(Render):
    """What both Messages renderers share: the request, the blocks of the MCP calls llmhost
    ran, the answer's id and its refusal in Anthropic's envelope."""

    def __init__(self, request, body, rounds):
        self.request = request
        self.conn = request.conn
        self.model = body["model"]
        self.stops = body.get("stop_sequences")
        self.rounds = rounds
        self.bindings = {}
        self.id = "msg_" + os.urandom(12).hex()

    def tools(self, bindings):
        self.bindings = bindings

    def mcp_uses(self, calls):
        uses = []
        for call in calls:
            binding = self.bindings.get(call["function"].get("name")) or {}
            uses.append({"type": "mcp_tool_use", "id": call["id"],
                         "name": binding.get("tool", call["function"].get("name")),
                         "server_name": binding.get("server", ""), "input": parsed_input(call)})
        return uses

    @staticmethod
    def mcp_results(calls, results):
        return [{"type": "mcp_tool_result", "tool_use_id": call["id"],
                 "is_error": not result["ok"], "content": [{"type": "text",
                                                            "text": result["text"]}]}
                for call, result in zip(calls, results)]

    @staticmethod
    def tool_uses(calls):
        return [{"type": "tool_use", "id": call["id"], "name": call["function"].get("name"),
                 "input": parsed_input(call)} for call in calls]

    def error_answer(self, status, body, retry_after):
        """An upstream's refusal before any byte went out, in Anthropic's envelope; a 200 that
        is no chat completion cannot be shown as a Message: a 502 that says so."""
        request = self.request
        if status == 200:
            status, message = 502, "upstream answer is not an OpenAI chat completion"
        else:
            message = "upstream: " + upstream_error_message(status, body)[0]
        request.status = status
        return request.conn.respond(request, status, JSON_TYPE + (
            [("Retry-After", retry_after)] if retry_after else []),
            json_bytes(anthropic_error(status, message)))


class MessagesJSON(MessagesRender):
    """A tool loop rendered as one Message: per round its text, the mcp_tool_use and
    mcp_tool_result blocks of the calls llmhost ran; then the last round's thinking and text
    and the client's tool_use blocks."""

    def __init__(self, request, body, rounds):
        super().__init__(request, body, rounds)
        self.steps = []  # each round that called MCP tools: its uses, then their results

    def calls(self, calls):
        self.steps.append(self.mcp_uses(calls))

    def results(self, calls, results):
        self.steps[-1] += self.mcp_results(calls, results)

    def refused(self, status, body, retry_after):
        return self.error_answer(status, body, retry_after)

    def finished(self, end):
        content = []
        for text, blocks in zip(end.texts, self.steps):
            if text:
                content.append({"type": "text", "text": text})
            content += blocks
        message = end.message or {}
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        text = end.texts[-1] if len(end.texts) > len(self.steps) else None
        if end.exhausted:
            text = f"{text}\n\n{rounds_note(self.rounds)}" if text else rounds_note(self.rounds)
        if isinstance(text, str) and text:
            content.append({"type": "text", "text": text})
        content += self.tool_uses(end.client_calls or ())
        reason, sequence = stop_reason(end, self.stops)
        request = self.request
        request.status = 200
        return request.conn.respond(request, 200, JSON_TYPE + [
            ("X-Llmhost-Server", request.server or "-")], json_bytes({
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": reason, "stop_sequence": sequence,
                "usage": anthropic_usage(end.usage)}))


# A stream's events that carry no text of their own, as named_event() makes them, field for
# field: message_start (message id, model) with its ping; a text block's start and a block's
# stop (index); the end (stop_reason, stop_sequence, input and output tokens).
MESSAGE_START_EVENTS = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"%s","type":"message",'
    b'"role":"assistant","model":%s,"content":[],"stop_reason":null,"stop_sequence":null,'
    b'"usage":{"input_tokens":0,"output_tokens":0,"cache_creation_input_tokens":0,'
    b'"cache_read_input_tokens":0}}}\n\nevent: ping\ndata: {"type":"ping"}\n\n')
TEXT_BLOCK_START_EVENT = (b'event: content_block_start\ndata: {"type":"content_block_start",'
                          b'"index":%d,"content_block":{"type":"text","text":""}}\n\n')
BLOCK_STOP_EVENT = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n'
MESSAGE_END_EVENTS = (
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":%s,'
    b'"stop_sequence":%s},"usage":{"input_tokens":%d,"output_tokens":%d,'
    b'"cache_creation_input_tokens":0,"cache_read_input_tokens":0}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


class MessagesSSE(MessagesRender):
    """A tool loop rendered as Anthropic's event stream: message_start (and a ping) once the
    upstream answered; a content block per run of thinking or text, its deltas as they come;
    a block per MCP call and result; the client's tool_use blocks at the end; message_delta
    with the stop reason and usage; message_stop. A ping while tools run."""

    stream = True

    def __init__(self, request, body, rounds):
        super().__init__(request, body, rounds)
        self.keep_alive = True
        self.index = -1  # the last block's index
        self.open = None  # the type of the block still open ("text", "thinking")
        self.texts = 0  # text blocks sent
        self.out = []  # the events of the upstream chunk at hand (one write for them all)

    def send(self, name, doc):
        self.out.append(named_event(name, {"type": name, **doc}))

    def flush(self):
        if self.out:
            self.conn.write_chunk(b"".join(self.out))
            self.out.clear()

    def opened(self, up):
        if self.conn.streaming:
            return
        self.keep_alive = self.conn.start_stream(self.request, 200, [
            ("Content-Type", "text/event-stream"), ("X-Llmhost-Server", up.name)] + SSE_HEADERS,
            MESSAGE_START_EVENTS % (self.id.encode(), json_bytes(self.model)))
        self.request.status = 200

    def begin(self, kind, block):
        """Open a block of `kind` unless one is open already."""
        if self.open == kind:
            return
        self.close()
        self.index += 1
        self.open = kind
        if kind == "text":
            self.out.append(TEXT_BLOCK_START_EVENT % self.index)
            return
        self.send("content_block_start", {"index": self.index, "content_block": block})

    def close(self):
        if self.open == "thinking":  # (the API signs a thinking block before it stops)
            self.send("content_block_delta", {"index": self.index, "delta": {
                "type": "signature_delta", "signature": ""}})
        if self.open is not None:
            self.out.append(BLOCK_STOP_EVENT % self.index)
        self.open = None

    def whole(self, block, partial_json=None):
        """A block sent whole: its start, its input as one input_json_delta, its stop."""
        self.close()
        self.index += 1
        self.send("content_block_start", {"index": self.index, "content_block": block})
        if partial_json is not None:
            self.send("content_block_delta", {"index": self.index, "delta": {
                "type": "input_json_delta", "partial_json": partial_json}})
        self.out.append(BLOCK_STOP_EVENT % self.index)

    def delta(self, doc, text, reasoning):
        if reasoning is None:  # (vLLM's newer name, and Ollama's)
            reasoning = (doc["choices"][0].get("delta") or {}).get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            self.begin("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            self.send("content_block_delta", {"index": self.index, "delta": {
                "type": "thinking_delta", "thinking": reasoning}})
        if not isinstance(text, str) or not text:
            return self.flush()
        if self.open != "text":
            if self.texts and text.startswith(ROUND_SEPARATOR):
                # A later round's text is a block of its own: the loop's separator goes.
                text = text[len(ROUND_SEPARATOR):]
                if not text:
                    return self.flush()
            self.texts += 1
            self.begin("text", {"type": "text", "text": ""})
        # (the stream's most frequent event, written without building its dict)
        self.out.append(b'event: content_block_delta\ndata: {"type":"content_block_delta",'
                        b'"index":%d,"delta":{"type":"text_delta","text":%s}}\n\n'
                        % (self.index, json_bytes(text)))
        self.flush()

    def calls(self, calls):
        for use in self.mcp_uses(calls):
            self.whole(dict(use, input={}), json_bytes(use["input"]).decode())
        self.flush()

    def results(self, calls, results):
        for block in self.mcp_results(calls, results):
            self.whole(block)
        self.flush()

    def waiting(self):
        if self.conn.streaming:
            self.conn.write_chunk(named_event("ping", {"type": "ping"}))

    def refused(self, status, body, retry_after):
        if not self.conn.streaming:
            return self.error_answer(status, body, retry_after)
        # A later round failed: the stream ends with its error event.
        message = "upstream: " + upstream_error_message(status, body)[0] if status != 200 \
            else "upstream answer is not an OpenAI chat completion"
        self.conn.end_stream(named_event("error", anthropic_error(
            status if status != 200 else 502, message)))
        return self.keep_alive

    def finished(self, end):
        if end.exhausted:
            note = ("\n\n" if self.open == "text" else "") + rounds_note(self.rounds)
            self.begin("text", {"type": "text", "text": ""})
            self.send("content_block_delta", {"index": self.index, "delta": {
                "type": "text_delta", "text": note}})
        self.close()
        for use in self.tool_uses(end.client_calls or ()):
            self.whole(dict(use, input={}), json_bytes(use["input"]).decode())
        reason, sequence = stop_reason(end, self.stops)
        usage = anthropic_usage(end.usage)
        self.out.append(MESSAGE_END_EVENTS % (json_bytes(reason), json_bytes(sequence),
                                              usage["input_tokens"], usage["output_tokens"]))
        self.conn.end_stream(b"".join(self.out))
        return self.keep_alive


# =============================================================================
# Application
# =============================================================================
# Owns: the routes table, the faces (the chat API's routes and renderers) and the request path:
#
#   client bytes -> HTTPServer reads the request (protocol error -> 4xx + close)
#     -> Host and Origin (403), path, auth (401), method: from the head, before the body
#     -> parse JSON, find the model (400/404) -> admission (queue / 429)
#     -> for each candidate upstream, in Router order (at most MAX_ATTEMPTS):
#          connect error, timeout, 429/502/503/504 before any byte -> mark it, try the next
#          got status + headers -> point of no return: relay to the client
#     -> client gone -> the upstream connection is aborted at once (generation stops)
#     -> upstream dies mid-stream -> one error event of the face's API, end of stream; never
#        [DONE] (a Responses or Messages request an entry takes natively is relayed so too)
#
# Errors become responses here (any HTTPError -> the OpenAI envelope) and in the HTTPServer
# (protocol errors before the application ran). Response bytes are relayed untouched except
# where a route must read them: base64 embeddings, rerank normalisation, error envelopes, and
# the events of a stream; those an upstream compressed anyway are decoded first (gzip, deflate;
# another coding is a 502), those only relayed keep their Content-Encoding.



class AccessLog:
    """One line per request, buffered and written once per sweep. A request only notes its
    fields; the lines are formatted together at the flush, off the requests' path (formatting
    them one by one, between socket reads and writes, cost a proxied request 3% of its time)."""
    LINE = "%s INFO %s %s model=%s server=%s status=%s %.1fms id=%s\n"

    def __init__(self, stream, enabled=True, json_lines=False):
        self.stream = stream
        self.enabled = enabled
        self.json_lines = json_lines  # --access-log-format json: one JSON object per line
        self.route_of = None  # path -> its route label (the Application's Metrics'), for JSON
        self.lines = []  # the fields of each line, in LINE's order
        self.stamp = time.strftime("%Y-%m-%d %H:%M:%S")  # refreshed each sweep, not per line
        self.shown = {}  # model name (the client's text) -> None, or as escaped for the log

    def add(self, request, status, model, server, now):
        if not self.enabled:
            return
        lines = self.lines
        if self.json_lines:
            lines.append((self.stamp, request.method, request.path, model or "-",
                          server or "-", status, (now - request.started) * 1000,
                          request.request_id, request.tokens, request.key_label,
                          request.first_byte))
        else:
            lines.append((self.stamp, request.method, request.path, model or "-",
                          server or "-", status, (now - request.started) * 1000,
                          request.request_id))
        if len(lines) >= 256:
            self.flush()

    def flush(self, _now=None):
        self.stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        if self.lines and self.json_lines:
            lines, self.lines = self.lines, []
            self.write("".join([self.json_line(f) for f in lines]))
        elif self.lines:
            lines, self.lines = self.lines, []
            line, shown = self.LINE, self.shown
            if any(f[3] not in shown for f in lines):  # (once per new model name)
                if len(shown) > LOG_NAMES_MAX - len(lines):  # a client sending a new name each time
                    shown.clear()
                for f in lines:
                    if f[3] not in shown:
                        shown[f[3]] = self.escaped(f[3])
            if all(shown[f[3]] is None for f in lines):  # as usual: no name needs escapes
                text = "".join([line % fields for fields in lines])
            else:
                text = "".join([line % (*f[:3], shown[f[3]] or f[3], *f[4:]) for f in lines])
                for f in lines:  # a long name is not kept: a client could fill memory with them
                    if len(f[3]) > LOG_MODEL_CHARS:
                        shown.pop(f[3], None)
            self.write(text)

    def write(self, text):
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def json_line(self, fields):
        """A usage record a user can total with jq: JSON escapes every character a client
        chose, so no request can forge a line; no key or prompt is in it."""
        stamp, method, path, model, server, status, ms, rid, tokens, label, first = fields
        doc = {"time": stamp, "id": rid, "method": method, "path": path[:LOG_MODEL_CHARS],
               "route": self.route_of(path) if self.route_of else None,
               "model": None if model == "-" else model[:LOG_MODEL_CHARS],
               "server": None if server == "-" else server, "status": status,
               "duration_ms": round(ms, 1)}
        if label is not None:
            doc["key"] = label
        if first is not None:
            doc["first_byte_ms"] = round(first * 1000, 1)
        if tokens:
            doc.update(prompt_tokens=tokens.get("prompt"),
                       completion_tokens=tokens.get("completion"))
        return json.dumps(doc, ensure_ascii=True) + "\n"

    @staticmethod
    def escaped(model):
        """A model name (the client's text) that could forge a line or a field (a line break or
        other control character, a space, a quote) quoted, with Python's escapes; one over
        LOG_MODEL_CHARS cut to that, quoted, then '...'; else None (written as it is)."""
        if len(model) <= LOG_MODEL_CHARS:
            if model.isprintable() and not any(c in model for c in ' "\\'):
                return None
            return '"%s"' % ascii(model)[1:-1].replace('"', '\\"')
        return '"%s"...' % ascii(model[:LOG_MODEL_CHARS])[1:-1].replace('"', '\\"')


LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "::1", "ip6-localhost"})
CORS_ALLOW_HEADERS = "Authorization, Content-Type, X-Api-Key, X-Request-Id, OpenAI-Organization"
# what browser code may read of an answer besides the CORS-safelisted fields
CORS_EXPOSE = ("Access-Control-Expose-Headers",
               "X-Request-Id, X-Llmhost-Server, X-Llmhost-Overhead-Ms, Retry-After, "
               "Mcp-Session-Id")
_FIELD_NAMES = re.compile(r"%s(?:[ \t]*,[ \t]*%s)*" % (_TOKEN.decode(), _TOKEN.decode()))


def is_mcp_path(path):
    """/mcp and /mcp/NAME: the MCP server face's, never aliases of /v1/mcp/..."""
    return path == "/mcp" or path.startswith("/mcp/")


def is_loopback_host(host):
    """True for names and addresses that can only mean this machine."""
    import ipaddress
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(value):
    """The name in a Host header: 'example.com:80' -> 'example.com', '[::1]:8' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def same_origin(origin, host):
    """Whether a browser's Origin ('http://127.0.0.1:4000') names the server the request was
    sent to (its Host, '127.0.0.1:4000'): the page is of our own origin, not another site's."""
    scheme, sep, authority = origin.lower().partition("://")
    if not sep or scheme not in ("http", "https") or not host:
        return False
    # An origin is scheme, host and port (RFC 6454 §4); both forms leave out the default port.
    default = ":443" if scheme == "https" else ":80"
    return authority.removesuffix(default) == host.lower().removesuffix(default)


class Detached:
    """The `conn` of a request llmhost makes itself (MCP sampling): no client to write to."""

    def __init__(self):
        self.gone = self.streaming = False
        self.upstream = self.on_gone = None

    def cork(self):
        pass

    def uncork(self):
        pass


def answer_as_is(request, status, data, retry_after):
    """An upstream answer that ends a tool loop before any byte went out: an error (in
    OpenAI's envelope, with the upstream's Retry-After), or a 200 that is not a chat
    completion, passed on as it came."""
    request.status = status
    if status != 200:
        return request.conn.respond(request, status, JSON_TYPE + (
            [("Retry-After", retry_after)] if retry_after else []),
            error_envelope_bytes(status, data))
    return request.conn.respond(request, 200, JSON_TYPE + [
        ("X-Llmhost-Server", request.server or "-")], data)


def exhausted_note(rounds):
    return f"\n\n[llmhost: stopped after {rounds} rounds of MCP tool calls]"


class ChatJSON(Render):
    """A tool loop rendered as one chat.completion: the last round's answer, with every
    round's text, the client's calls it ended on, the usage of all rounds and `mcp_calls`."""

    def __init__(self, request, rounds):
        self.request = request
        self.rounds = rounds

    def refused(self, status, body, retry_after):
        return answer_as_is(self.request, status, body, retry_after)

    def finished(self, end):
        request = self.request
        doc, message = end.doc, end.message
        if len(end.texts) > 1 and end.text():
            message["content"] = end.text()
        if end.exhausted:
            message["content"] = ((message.get("content") or "") +
                                  exhausted_note(self.rounds)).strip()
            message.pop("tool_calls", None)
            doc["mcp_rounds_exhausted"] = True
        elif end.client_calls:
            doc["choices"][0]["message"] = dict(message, tool_calls=end.client_calls)
        doc["choices"][0]["finish_reason"] = end.finish_reason()
        doc["usage"] = end.usage or doc.get("usage")
        doc["mcp_calls"] = end.report
        request.status = 200
        return request.conn.respond(request, 200, JSON_TYPE + [
            ("X-Llmhost-Server", request.server or "-")], json_bytes(doc))


class ChatSSE(Render):
    """A tool loop rendered as a chat.completion.chunk stream: the upstream's chunks as they
    come; at the end the client's calls (or the note that the rounds ran out), the finish with
    `mcp_calls`, the usage when the client asked for it, and [DONE]."""

    stream = True

    def __init__(self, request, rounds, include_usage):
        self.request = request
        self.conn = request.conn
        self.rounds = rounds
        self.include_usage = include_usage
        self.keep_alive = True

    def opened(self, up):
        if not self.conn.streaming:
            self.keep_alive = self.conn.start_stream(self.request, 200, [
                ("Content-Type", "text/event-stream"), ("X-Llmhost-Server", up.name)]
                + SSE_HEADERS)
            self.request.status = 200

    def delta(self, doc, text, reasoning):
        self.conn.write_chunk(sse_event(doc))

    def waiting(self):  # an SSE comment: clients ignore it, proxies see traffic
        if self.conn.streaming:
            self.conn.write_chunk(b": llmhost: running tools\n\n")

    def refused(self, status, body, retry_after):
        if not self.conn.streaming:
            return answer_as_is(self.request, status, body, retry_after)
        # a later round failed: an error event ends the stream
        self.conn.write_chunk(sse_event(json_loads(error_envelope_bytes(
            status if status != 200 else 502, body))))
        self.conn.end_stream()
        return self.keep_alive

    def finished(self, end):
        conn = self.conn
        tail = dict(end.template or {"object": "chat.completion.chunk"})
        tail.pop("usage", None)
        if end.exhausted:
            conn.write_chunk(sse_event(dict(tail, choices=[{"index": 0, "delta": {
                "content": exhausted_note(self.rounds)}, "finish_reason": None}])))
        elif end.client_calls:
            conn.write_chunk(sse_event(dict(tail, choices=[{"index": 0, "delta": {"tool_calls": [
                dict(call, index=i) for i, call in enumerate(end.client_calls)]},
                "finish_reason": None}])))
        conn.write_chunk(sse_event(dict(tail, choices=[{"index": 0, "delta": {},
                                                        "finish_reason": end.finish_reason()}],
                                        mcp_calls=end.report,
                                        **({"mcp_rounds_exhausted": True} if end.exhausted
                                           else {}))))
        if self.include_usage:
            conn.write_chunk(sse_event(dict(tail, choices=[], usage=end.usage)))
        conn.end_stream(sse_event(b"[DONE]"))  # with the end: a client may close on [DONE]
        return self.keep_alive


class Application:
    def __init__(self, router, client, admission, *, api_keys=(), access_log=None,
                 allowed_hosts=None, cors_origins=(), mcp_environ=None, mcp_roots=(),
                 mcp_max_rounds=MCP_MAX_ROUNDS, mcp_allow_urls=(), processes=None,
                 metrics_public=False, key_labels=None, mcp_tokens=None, mcp_expose=None,
                 mcp_secret=None, mcp_workers=False):
        self.router = router
        self.processes = processes  # ProcessManager for entries llmhost starts itself
        # MCP servers connect on first use; until then this costs nothing (no `mcp` import).
        # Their OAuth tokens are in the file mcp_tokens (serve refreshes them, never logs in).
        self.mcp = MCPHub({}, environ=mcp_environ or {}, sampler=self.sample, roots=mcp_roots,
                          tokens=mcp_tokens)
        # llmhost as an MCP server: /mcp and /mcp/NAME (see MCP server)
        self.mcp_front = MCPFront(self.mcp, admission, expose=mcp_expose, secret=mcp_secret,
                                  workers=mcp_workers)
        self.mcp_max_rounds = mcp_max_rounds
        self.mcp_allow_urls = tuple(mcp_allow_urls)
        self.mcp_callers = {}  # MCP server -> {model: its requests' calls running} (sampling)
        self.client = client
        self.admission = admission
        self.key_labels = dict(key_labels or {})  # key -> its label (--api-keys-file)
        self.api_keys = tuple(api_keys) + tuple(k for k in self.key_labels if k not in api_keys)
        self.access_log = access_log
        # None: any Host (not bound to loopback). Else a browser on this machine could be
        # pointed at us through DNS rebinding: only loopback names and these hosts pass.
        self.allowed_hosts = None if allowed_hosts is None else {
            h.lower() for h in allowed_hosts}
        self.host_verdicts = {}  # Host header -> allowed? (parsing addresses per request is slow)
        self.cors_origins = frozenset(cors_origins)
        self.sender = Sender(router, client, admission, processes)
        self.started = time.time()
        self.ids = "%x" % (int(time.time() * 1000) & 0xFFFFFFFFFF)
        self.counter = 0
        # path -> {method: handler}; then paths that take a suffix (an id, a name/action)
        self.routes = {
            "/v1/chat/completions": {"POST": self.chat},
            "/v1/completions": {"POST": self.completions},
            "/v1/embeddings": {"POST": self.embeddings},
            "/v1/rerank": {"POST": self.rerank},
            "/v1/reranking": {"POST": self.rerank},  # llama.cpp's name
            "/v1/messages": {"POST": self.messages},
            "/v1/messages/count_tokens": {"POST": self.count_tokens},
            "/v1/models": {"GET": self.models},
            "/v1/status": {"GET": self.status},
            "/v1/mcp/servers": {"GET": self.mcp_servers},
            "/v1/mcp/tools": {"GET": self.mcp_tools},
            "/health": {"GET": self.health},
            "/v1/health": {"GET": self.health},
            "/metrics": {"GET": self.metrics_page},
        }
        front = self.mcp_front
        mcp_methods = {"POST": front.http_post, "GET": front.http_get,
                       "DELETE": front.http_delete}
        self.routes["/mcp"] = mcp_methods
        self.prefix_routes = [
            ("/v1/models/", {"GET": self.model_detail}),
            ("/v1/processes/", {"POST": self.process_action}),
            ("/mcp/", mcp_methods),
        ]
        # path or prefix -> the Face whose API it speaks (else OpenAI's)
        self.faces = {"/v1/messages": MESSAGES_FACE, "/v1/messages/count_tokens": MESSAGES_FACE,
                      "/mcp": MCP_FACE, "/mcp/": MCP_FACE}
        self.open_routes = {"/health", "/v1/health"}
        if metrics_public:  # a scraper without the key; the rest stays behind it
            self.open_routes.add("/metrics")
        self.metrics = Metrics(self)
        if access_log is not None:
            access_log.route_of = self.metrics.route_of

    # -- dispatch --------------------------------------------------------------------------
    async def handle(self, request):
        """Answer one request; return whether the connection may be kept open."""
        rid = request.headers.get("x-request-id")
        if rid is None or not REQUEST_ID_RE.fullmatch(rid):
            self.counter += 1
            rid = "%s-%x" % (self.ids, self.counter)
        request.request_id = rid
        conn = request.conn
        try:
            keep_alive = await self.dispatch(request)
        except HTTPError as exc:
            keep_alive = self.fail(request, exc)
        except Exception:
            log_exception(f"request {rid} failed")
            keep_alive = self.fail(request, HTTPError("internal error in llmhost; see its log"))
        except BaseException:  # cancelled: cut by a shutdown that stopped waiting for it
            now = time.monotonic()
            self.metrics.answered(request, request.status or 503, now)  # (503 if nothing
            if self.access_log is not None:  # went out)
                self.access_log.add(request, request.status or 503, request.model,
                                    request.server, now)
            raise
        now = time.monotonic()
        status = 499 if conn.gone and not request.complete else request.status
        self.metrics.answered(request, status, now)
        if self.access_log is not None:
            self.access_log.add(request, status, request.model, request.server, now)
        request.face = None  # (a Responses render is its request's face, and refers to it: a
        return keep_alive  # cycle, which the cyclic GC would have to find; see serve's gc)

    def fail(self, request, exc):
        conn = request.conn
        if conn.gone:
            return False
        request.status = exc.status
        face = request.face or OPENAI_FACE
        if conn.streaming:  # too late for a status: end the stream with an error event
            conn.write_chunk(face.error_event(exc))
            conn.end_stream()
            return request.keep_alive
        if exc.close:
            request.keep_alive = False
        return conn.respond(request, exc.status, JSON_TYPE + exc.headers, face.error_body(exc))

    def dispatch(self, request):
        """-> the coroutine that answers `request` (returned, not awaited here: a level less
        to resume on each of its wake-ups); the refusals its head earns are raised."""
        route = request.route  # (found, its Host and Origin checked, before a body was read)
        if route is None:
            self.check_head(request)
        origin = request.headers.get("origin")
        if origin is not None and self.cors_origins:
            if "*" in self.cors_origins:
                request.extra = [("Access-Control-Allow-Origin", "*"), CORS_EXPOSE]
            elif origin in self.cors_origins:
                # a parsed header value: no CR, LF or NUL can be in it
                request.extra = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
                                 CORS_EXPOSE]
            if request.method == "OPTIONS" and request.extra:
                return self.preflight(request)
        handler, rest = route or self.route(request)
        return handler(request) if rest is None else handler(request, rest)

    def check_head(self, request):
        """The Host and Origin checks, refused in the error shape of the API the path names
        (its face: route() finds the same one, but these come first)."""
        path = request.path
        request.face = MCP_FACE if is_mcp_path(path) else \
            self.faces.get(path if path.startswith("/v1/") else "/v1" + path)
        headers = request.headers
        if self.allowed_hosts is not None and "host" in headers:
            self.check_host(request)
        if "origin" in headers or "sec-fetch-site" in headers:  # (curl and the SDKs: neither)
            self.check_origin(request)

    def check_host(self, request):
        if self.allowed_hosts is not None and "host" in request.headers:  # (none: HTTP/1.0,
            header = request.headers["host"]  # a health check; never a browser's request)
            allowed = self.host_verdicts.get(header)
            if allowed is None:
                allowed = is_loopback_host(host_name(header)) or \
                    host_name(header) in self.allowed_hosts
                if len(self.host_verdicts) < HOST_VERDICTS_MAX:
                    self.host_verdicts[header] = allowed
            if not allowed:
                host = host_name(header)
                raise Forbidden(f"Host {host!r} is not allowed (DNS rebinding protection); "
                                "start serve with --allowed-host NAME to allow it.",
                                code="host_not_allowed")

    def check_origin(self, request):
        """Refuse a request that a web page of another site made (cross-site request forgery).
        Its body need not be JSON-typed to be read as JSON, so a "simple" request (text/plain,
        no preflight) would run; and a browser on this machine reaches loopback. A browser
        names the page's origin in Origin on every cross-origin POST (the Fetch standard) and
        says where the request comes from in Sec-Fetch-Site (a field no page can set); curl and
        the SDKs send neither and pass. A page may use llmhost from an --cors-origin ('*': any)
        and from llmhost's own origin (the Origin names the Host, or the browser says
        same-origin: a page served beside us by the same reverse proxy)."""
        headers = request.headers
        origin = headers.get("origin")
        site = headers.get("sec-fetch-site")
        if origin is None and site not in ("cross-site", "same-site"):
            return
        if site == "same-origin" or origin is not None and (
                origin in self.cors_origins or "*" in self.cors_origins or
                same_origin(origin, headers.get("host", ""))):
            return
        # Ollama answers a foreign Origin the same way (403 unless OLLAMA_ORIGINS lists it).
        if origin is None:
            raise Forbidden(f"A request from a web page of another site (Sec-Fetch-Site: {site}) "
                            "is not allowed without an Origin; start serve with --cors-origin "
                            "ORIGIN to let a web app at ORIGIN use llmhost.",
                            code="origin_not_allowed")
        raise Forbidden(f"Origin {origin[:100]!r} is not allowed: web pages of other sites may "
                        f"not use llmhost; start serve with --cors-origin {origin[:100]} to "
                        "allow it.", code="origin_not_allowed")

    def route(self, request):
        """-> (handler, what follows a prefix route's prefix or None), or the error the request
        is refused with (its path, API key or method): all known from its head."""
        path = request.path
        methods = self.routes.get(path)
        if methods is None and not path.startswith("/v1/") and not is_mcp_path(path):
            path = "/v1" + path  # clients configured without /v1 still work (not /mcp/...)
            methods = self.routes.get(path)
        rest = None  # (a model id, a process's action)
        where = path
        if methods is None:
            for prefix, candidates in self.prefix_routes:
                if path.startswith(prefix):
                    methods, rest, where = candidates, path[len(prefix):], prefix
                    break
            else:
                raise NotFound(f"Unknown path {request.path!r}; see /v1/models, "
                               "/v1/chat/completions, /v1/embeddings, /v1/rerank.")
        request.face = self.faces.get(where)
        if self.api_keys and path not in self.open_routes and request.method != "OPTIONS":
            key = check_api_key(request.headers, self.api_keys)
            if self.key_labels:
                request.key_label = self.key_labels.get(key)
        handler = methods.get(request.method) or (
            methods.get("GET") if request.method == "HEAD" else None)
        if handler is None:
            allowed = ", ".join(["GET", "HEAD", *[m for m in methods if m != "GET"]]
                                if "GET" in methods else methods)
            raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}; "
                                   f"use {' or '.join(methods)}.", headers=[("Allow", allowed)])
        if request.has_body and request.method != "POST":  # (refused unread: read_request)
            raise BadRequest(f"{request.method} {request.path} takes no request body.",
                             code="unexpected_body")
        return handler, rest

    def refuses_unread(self, request):
        """Whether a request with a body will be refused whatever the body holds (a Host or
        Origin not allowed, an unknown path, a missing or wrong API key, another method, a
        route that takes no body), so the HTTP layer need not read it, nor send 100 Continue
        for it. dispatch() gives the answer."""
        try:
            self.check_head(request)
            if request.method == "OPTIONS":  # (a preflight has no body; another is no
                return request.has_body  # request of ours: either way, its body is unread)
            request.route = self.route(request)  # (so dispatch need not find it again)
        except HTTPError:
            return True
        return False

    async def preflight(self, request):
        """Answer a CORS preflight (the Fetch standard's OPTIONS with Access-Control-*)."""
        request.status = 204
        # The fields the page asks to send (the openai JS client adds X-Stainless-* ones); the
        # origin is already one we serve, so any well-formed list is granted.
        asked = request.headers.get("access-control-request-headers", "").strip()
        return request.conn.respond(request, 204, [
            ("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS"),
            ("Access-Control-Allow-Headers",
             asked if _FIELD_NAMES.fullmatch(asked) else CORS_ALLOW_HEADERS),
            ("Access-Control-Max-Age", "600")])

    def reply_json(self, request, doc, status=200):
        request.status = status
        return request.conn.respond(request, status, JSON_TYPE, json_bytes(doc))

    # -- small routes ----------------------------------------------------------------------
    async def health(self, request):
        return self.reply_json(request, {"status": "ok"})

    async def metrics_page(self, request):
        request.status = 200
        return request.conn.respond(request, 200, [("Content-Type", METRICS_TYPE)],
                                    self.metrics.render())

    def model_object(self, name, servers):
        doc = {"id": name, "object": "model", "created": int(self.started),
               "owned_by": servers[0], "servers": servers}
        managed = [self.processes.servers[s] for s in servers if s in self.processes.servers]
        if managed:  # managed models are listed whether running or not, with their state
            states = [m.state for m in managed]
            doc["state"] = next((st for st in ("running", "starting") if st in states), states[0])
        return doc

    async def models(self, request):
        data = [self.model_object(name, servers) for name, servers in self.router.public_models()]
        return self.reply_json(request, {"object": "list", "data": data})

    async def model_detail(self, request, rest):
        from urllib.parse import unquote
        name = unquote(rest)
        pool = self.router.pool(name)  # (not resolve(): a GET must not turn the round-robin)
        return self.reply_json(request, self.model_object(name, [up.name for up, _ in pool]))

    async def status(self, request):
        now = self.router.clock()
        servers = [{
            "name": up.name, "url": hide_password(up.entry.get("url") or up.origin.base_url),
            "managed": up.managed, "models": up.public_names(),
            "healthy": up.cooldown_until <= now,
            "cooldown_seconds": round(max(0.0, up.cooldown_until - now), 1),
            "in_flight": up.in_flight, "requests": up.requests, "errors": up.errors,
            "consecutive_failures": up.failures, "last_error": up.last_error,
        } for up in self.router.upstreams.values()]
        adm = self.admission
        managed = [m.info(now) for m in self.processes.servers.values()]
        return self.reply_json(request, {"processes": managed,
            "version": __version__, "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 1),
            "in_flight": adm.active, "queued": adm.queued(), "max_concurrency": adm.limit,
            "rejected": adm.rejected, "servers": servers,
            "mcp_clients": self.mcp_front.status()})

    async def process_action(self, request, rest):
        """POST /v1/processes/NAME/load or /unload: start or stop a managed server now."""
        name, _, action = rest.partition("/")
        server = self.processes.servers.get(name)
        if server is None or action not in ("load", "unload"):
            raise NotFound(f"No managed server {name!r} (or no action {action!r}); managed: "
                           f"{', '.join(self.processes.servers) or 'none'}.")
        if action == "load":
            await self.processes.ensure(server.up)
        else:
            await self.processes.stop(server, "unload requested")
        return self.reply_json(request, server.info(time.monotonic()))

    # -- proxied routes --------------------------------------------------------------------
    def chat(self, request):  # (-> the coroutine that answers: one level less to resume)
        body = parse_json_body(request, "chat")
        selection = self.mcp_selection(body)
        if selection:
            return self.chat_with_mcp(request, body, selection)
        return self.forward(request, body, "/chat/completions", raw=request.body)

    async def completions(self, request):
        body = parse_json_body(request, "completions")
        return await self.forward(request, body, "/completions", raw=request.body)

    async def embeddings(self, request):
        body = parse_json_body(request, "embeddings")
        transform = embeddings_as_base64 if body.get("encoding_format") == "base64" else None
        return await self.forward(request, body, "/embeddings", transform=transform,
                                  raw=request.body)

    async def rerank(self, request):
        body = parse_json_body(request, "rerank")
        texts = rerank_documents(body["documents"])
        model = body["model"]
        return_documents = bool(body.get("return_documents"))
        raw = request.body
        if any(not isinstance(d, str) for d in body["documents"]):
            body = dict(body, documents=texts)  # upstreams take plain strings
            raw = None
        return await self.forward(request, body, "/rerank", raw=raw, transform=lambda data: (
            normalize_rerank(data, model, texts, body.get("top_n"), return_documents)))

    async def messages(self, request):
        """Anthropic's Messages API: the request as a chat body through the tool loop (one
        round without MCP tools), rendered as a Message or its stream (see Messages API)."""
        body = parse_json_body(request, "messages")
        chat = messages_as_chat(body)
        render = (MessagesSSE if body.get("stream") else MessagesJSON)(
            request, body, self.mcp_max_rounds)
        selection = self.mcp_selection(chat)
        return await self.run_loop(request, chat, selection, render, None if selection else
                                   self.native_relay(request, "messages", body, MESSAGES_FACE))

    def native_relay(self, request, api, body, face, only=False):
        """A Native for a request of the face of `api` whose model has an entry opted in to that
        API, or None. Only for a request llmhost runs no tools for (the caller's to know). Its
        answer is relayed as chat's is (the bytes of a stream untouched), errors in `face`'s
        envelope, a stream that dies ended with `face`'s error event."""
        if not any(api in up.native for up, _ in self.router.pool(body["model"])):
            return None

        async def deliver(up, resp, data, overhead):
            request.face = face  # (from here, an error's shape is the relayed API's own)
            return Relayed(await self.relay(request, up, resp, data, None, overhead,
                                            face=face))

        return Native(api, body, request.body, request.query, face.native_fields(
            request.headers), deliver, only)

    async def count_tokens(self, request):
        """An estimate (estimate_tokens): no upstream is asked, which the answer says."""
        chat = messages_as_chat(parse_json_body(request, "messages"), count_only=True)
        self.router.pool(chat["model"])  # an unknown model: 404, as Anthropic answers
        request.status = 200
        return request.conn.respond(request, 200, JSON_TYPE + [
            ("X-Llmhost-Token-Count", "estimate")], json_bytes(
                {"input_tokens": estimate_tokens(chat, IMAGE_TOKENS_ANTHROPIC),
                 "estimate": True}))

    async def forward(self, request, body, suffix, transform=None, raw=None, native=None):
        """Route `body` (sent as `raw` when that is its unchanged encoding) and relay the answer
        (`native`: see Sender.send)."""
        model = body["model"]  # (an unknown one: admit()'s first look is a 404, before any wait)
        conn = request.conn

        usage_added = native is None and wants_usage_added(body)

        def deliver(up, resp, data, overhead):
            return self.relay(request, up, resp, data, transform, overhead,
                              usage_added and up.stream_usage)

        await self.sender.admit(model, conn)
        try:  # ordered now, after the wait: health and load may have changed meanwhile
            return await self.sender.send(request, body, self.router.resolve(model), suffix,
                                          raw, deliver, native)
        finally:
            self.admission.release()

    async def relay(self, request, up, resp, body, transform, overhead, strip=False,
                    face=OPENAI_FACE):
        """Answer the client with `resp`: its buffered `body`, or (None) its SSE stream, an
        error in `face`'s envelope (and a stream's end after a death its event)."""
        conn = request.conn
        status = resp.status
        ctype = resp.headers.get("content-type", "application/json")
        passed = resp.passed
        encoding = content_encoding(resp)
        # A body llmhost reads (a stream's events, an error, a transform) is decoded, and goes
        # out without the upstream's Content-Encoding; one it only relays keeps it.
        reads = body is None or status >= 400 or transform is not None
        if encoding and reads:
            passed = [field for field in passed if field[0] != "content-encoding"]
        headers = [("Content-Type", ctype), ("X-Llmhost-Server", up.name),
                   ("X-Llmhost-Overhead-Ms", "%.2f" % overhead), *passed]
        request.status = status
        if body is None:
            return await self.relay_stream(request, up, resp, headers + SSE_HEADERS,
                                           content_decoder(encoding), strip, face)
        if encoding and reads:
            body = decode_content(body, encoding)
        if status >= 400:
            body = face.upstream_error(status, body)
            headers[0] = JSON_TYPE[0]
            retry_after = resp.headers.get("retry-after")
            if retry_after:  # (parse_response_head refused control characters in it)
                headers.append(("Retry-After", retry_after))
        elif transform is not None:  # (UpstreamError, saying what was expected)
            body = transform(body)
        elif status == 200 and not encoding:  # (one still compressed is not read)
            self.metrics.usage(request, body)
        return conn.respond(request, status, headers, body)

    async def relay_stream(self, request, up, resp, headers, decoder=None, strip=False,
                           face=OPENAI_FACE):
        """Relay SSE bytes as they arrive. Only whole events are passed on (the bytes up to the
        last blank line), so an error event after an upstream death is never glued to half of
        an event; upstreams send whole events per write, so this holds nothing back. Bytes that
        are already at hand share a write with the head or the end (fewer syscalls). A stream
        an upstream compressed anyway is decoded (`decoder`): events are found in plain text."""
        conn = request.conn
        transport = conn.transport
        read = resp.read_some if decoder is None else lambda: read_decoded(resp, decoder)
        keep_alive = None
        tail = b""
        pending = b""  # whole events read but not written yet
        last = b""  # the last piece written: a stream's usage comes just before its end
        try:
            if resp.buffered():
                pending = await read()
                if not resp.done:
                    pending, tail = whole_events(pending)
            self.metrics.stream_opened(request, time.monotonic())
            if strip and b'"usage"' in pending:
                pending = self.strip_usage(request, pending)
            if resp.done or pending.endswith(SSE_DONE):  # the whole stream was at hand: head,
                if not strip:  # (strip_usage read the usage llmhost asked for)
                    self.metrics.usage(request, pending)
                keep_alive = conn.start_stream(request, resp.status, headers, pending, end=True)
                stream_delivered(request, resp)  # events and end in one write
                return keep_alive
            keep_alive = conn.start_stream(request, resp.status, headers, pending)
            close_framed = resp.framing == "close"  # its end is the close, so a death looks
            done_seen = close_framed and face.stream_ended(pending)  # like an end: was [DONE]
            last = pending  # (or the API's last event) sent?
            pending = b""
            while True:
                data = await read()
                if not data or conn.gone:  # (gone: cut by SEND_TIMEOUT, say, with upstream
                    break  # bytes still at hand: nothing more is written)
                if tail:
                    data = tail + data
                data, tail = whole_events(data)
                if strip and b'"usage"' in data:  # (the usage chunk llmhost asked for, and
                    data = self.strip_usage(request, data)  # the client did not, goes)
                if resp.done or data.endswith(SSE_DONE):  # the last piece: written with the
                    pending = data  # end of the stream (a client may close once it reads
                    break  # [DONE], as the openai client does, before the upstream's end)
                conn.write_chunk(data)
                last = data
                if close_framed and not done_seen:
                    done_seen = face.stream_ended(data)
                if transport.get_write_buffer_size() > RELAY_CHUNK:
                    await conn.drain()
            error = cut_short(resp, done_seen or face.stream_ended(pending + tail))
            if error is not None and not conn.gone:  # (a client that left closed it: not
                self.router.failed(up, error.message)  # the upstream's fault)
                pending += face.stream_error(error, last + pending)  # (a half event in
                # `tail` is dropped)
            else:
                pending += tail
        except UpstreamError as exc:
            if conn.gone:
                return False
            self.router.failed(up, exc.message)
            if keep_alive is None:
                raise
            conn.write_chunk(face.stream_error(exc, last + pending))
        except (ConnectionError, OSError):
            resp.close()
            return False
        if conn.gone:
            resp.close()
            return False
        if keep_alive is not None and not strip:  # the usage the client asked for (read
            self.metrics.usage(request, last + pending)  # once a stream: cheap)
        conn.end_stream(pending)
        stream_delivered(request, resp)  # [DONE] may come before the upstream's end
        return keep_alive

    def strip_usage(self, request, data):
        """Take the usage chunk llmhost asked for out of `data`, its numbers kept."""
        if b'"usage"' not in data:
            return data
        data, event = without_usage_event(data)
        if event is not None:
            self.metrics.usage(request, event)
        return data

    # -- MCP: tools executed by llmhost --------------------------------------------------
    async def mcp_servers(self, request):
        return self.reply_json(request, {"object": "list", "data": self.mcp.status(),
                                         "clients": self.mcp_front.status()})

    async def mcp_tools(self, request):
        """Every registered MCP server's tools; with ?model=NAME, those that model's requests
        get (the servers its entries attach), as `chat`'s /tools shows them."""
        from urllib.parse import parse_qs
        model = (parse_qs(request.query).get("model") or [None])[-1]
        names = list(self.mcp.specs())
        if model is not None:
            attached = [n for up, _ in self.router.pool(model) for n in up.entry.get("mcp", ())]
            names = [n for n in names if n in attached]
        bindings = await self.mcp.tools(names) if names else []
        return self.reply_json(request, {"object": "list", "data": [
            dict(b["openai"], server=b["server"], tool=b["tool"]) for b in bindings]})

    def mcp_selection(self, body, approvals=False):
        """-> (servers, allowed) whose tools this chat request gets, or None. Per request: tools
        of type "mcp" (the Responses-API shape); per model: the `mcp` list of its servers.
        `approvals`: the face can pause for a client's approval (Responses), so an mcp tool may
        ask for one; chat cannot, and refuses it."""
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise BadRequest("'tools' must be an array.", param="tools", code="invalid_type")
        requested = [t for t in tools or () if isinstance(t, dict) and t.get("type") == "mcp"]
        if not requested and not self.router.mcp_attached:
            return None
        n = body.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and n > 1:  # the loop runs the calls
            if requested:  # of one answer: a request that asks for several gets no MCP tools
                raise BadRequest("MCP tools are run for one answer: with tools of type 'mcp', "
                                 "'n' must be 1.", param="n", code="unsupported_value")
            return None  # (its model's attached servers are left out)
        servers, allowed, request_servers = [], {}, []
        known = self.mcp.specs()
        for tool in requested:
            label = tool.get("server_label")
            if not isinstance(label, str) or not NAME_RE.fullmatch(label):
                raise BadRequest("An mcp tool needs a 'server_label' of 1-64 [A-Za-z0-9._-].",
                                 param="tools")
            if not approvals and tool.get("require_approval", "never") != "never":
                raise BadRequest("llmhost runs MCP tools without asking: 'require_approval' must "
                                 "be 'never'.", param="tools")
            url = tool.get("server_url")
            if url is not None:
                if not isinstance(url, str) or not any(
                        url_under(url, prefix) for prefix in self.mcp_allow_urls):
                    raise BadRequest(f"server_url {url!r} is not allowed: start serve with "
                                     "--mcp-allow-url PREFIX to allow it.", param="tools",
                                     code="mcp_url_not_allowed")
                spec = {"url": url, "headers": tool.get("headers") or {}}
                problems = validate_mcp_entry(label, spec)
                if problems:
                    raise BadRequest("; ".join(problems), param="tools")
                if label in known:
                    raise BadRequest(f"server_label {label!r} is a registered MCP server; give "
                                     "another label for a server_url.", param="tools")
                if any(label == named for named, _ in request_servers):
                    raise BadRequest(f"server_label {label!r} names two servers in this "
                                     "request; give each its own label.", param="tools")
                request_servers.append((label, spec))
            elif label not in known:
                raise BadRequest(f"No MCP server named {label!r}; registered: "
                                 f"{', '.join(known) or 'none'}.", param="tools",
                                 code="mcp_server_not_found")
            if label not in servers:
                servers.append(label)
            names = tool.get("allowed_tools")
            if isinstance(names, dict):
                names = names.get("tool_names")
            if isinstance(names, list):
                allowed.setdefault(label, []).extend(names)
        for up, _ in self.router.pool(body["model"]):
            for name in up.entry.get("mcp", ()):
                if name not in servers:
                    servers.append(name)
        if not servers:
            return None
        if any(not isinstance(t, dict) for t in tools or ()):  # (we read them: MCP tools join)
            raise BadRequest("Each entry of 'tools' must be an object.", param="tools",
                             code="invalid_type")
        return servers, allowed, request_servers

    async def sample(self, server, params):
        """An MCP server's sampling request, answered by one of our models: the server's
        `sampling_model`, else the model of the requests whose calls it is running (sampling
        requests do not say which call they belong to: with calls for two models running, the
        prompt, which may hold one client's data, goes to neither)."""
        model = self.mcp.specs().get(server, {}).get("sampling_model")
        if not model:
            models = self.mcp_callers.get(server, ())
            if len(models) > 1:
                raise RuntimeError(f"requests for {len(models)} models are calling its tools; "
                                   "set sampling_model on the MCP server to choose one")
            model = next(iter(models), None)
        if not model:
            raise RuntimeError("no model to sample with: set sampling_model on the MCP server")
        body = dict(params, model=model, stream=False)
        request = Request("POST", "/v1/chat/completions", "1.1", {})
        request.conn = Detached()
        request.started = request.received = time.monotonic()
        request.request_id = f"sampling-{server}"
        status, data, _ = await self.sender.complete(request, body, self.router.resolve(model))
        if status != 200:
            raise RuntimeError(f"model {model} answered HTTP {status}")
        doc = json_loads(data)
        choice = doc["choices"][0]
        return {"text": choice["message"].get("content") or "", "model": doc.get("model", model),
                "stop_reason": {"length": "maxTokens", "stop": "endTurn"}.get(
                    choice.get("finish_reason"), "endTurn")}

    async def run_mcp_calls(self, request, calls, bindings, report, client_names=(), tick=None):
        """Run this round's MCP tool calls concurrently -> one result dict per call; `tick()`
        every MCP_KEEPALIVE while they run. A client that leaves cancels them (the SDK tells
        each server)."""
        import asyncio

        async def one(call):
            name = call["function"].get("name")
            binding = bindings.get(name)
            if binding is None:  # a name the model made up (small models do)
                known = sorted(set(bindings) | set(client_names))
                text = (f"Error: there is no tool named {str(name)[:100]!r}. The tools you can "
                        f"call: {', '.join(known[:50]) or 'none'}.")
                return ({"ok": False, "text": text, "duration_ms": 0.0, "error": "unknown tool"},
                        {"id": call.get("id"), "server": None, "tool": name,
                         "arguments": call["function"].get("arguments"), "ok": False,
                         "error": "unknown tool", "duration_ms": 0.0})
            try:
                args = call["function"].get("arguments") or "{}"
                args = json_loads(args) if isinstance(args, str) else args  # some send objects
                if not isinstance(args, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                args = call["function"].get("arguments")
                result = {"ok": False, "text": f"Error: the arguments are not a JSON object "
                          f"({exc}); call the tool again with valid JSON.", "duration_ms": 0.0,
                          "error": "invalid arguments"}
            else:
                try:
                    result = await self.mcp.call(binding["server"], binding["tool"], args)
                except MCPError as exc:
                    result = {"ok": False, "text": f"Error: {exc.message}", "duration_ms": 0.0,
                              "error": exc.message}
            return result, {"id": call.get("id"), "server": binding["server"],
                            "tool": binding["tool"], "arguments": args, "ok": result["ok"],
                            "error": result["error"], "duration_ms": result["duration_ms"]}

        servers = [bindings[c["function"]["name"]]["server"] for c in calls
                   if c["function"].get("name") in bindings]
        for server in servers:
            callers = self.mcp_callers.setdefault(server, {})
            callers[request.model] = callers.get(request.model, 0) + 1
        conn = request.conn
        task = asyncio.ensure_future(asyncio.gather(*(one(c) for c in calls)))
        conn.on_gone = task.cancel
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=MCP_KEEPALIVE)
                if done:
                    report.extend(entry for _, entry in task.result())  # in call order
                    self.metrics.mcp_calls([entry for _, entry in task.result()],
                                           self.mcp.specs())
                    return [result for result, _ in task.result()]
                if tick is not None:
                    tick()
        except asyncio.CancelledError:
            task.cancel()  # the calls end with us (client gone, or shutdown)
            if conn.gone:
                raise ClientGone("client closed the request") from None
            raise
        finally:
            conn.on_gone = None
            for server in servers:
                callers = self.mcp_callers[server]
                callers[request.model] -= 1
                if not callers[request.model]:
                    del callers[request.model]

    async def chat_with_mcp(self, request, body, selection):
        """A chat request whose model gets MCP tools: the tool loop, rendered as chat."""
        if body.get("stream") is True:
            render = ChatSSE(request, self.mcp_max_rounds, bool(
                (body.get("stream_options") or {}).get("include_usage")))
        else:
            render = ChatJSON(request, self.mcp_max_rounds)
        return await self.run_loop(request, body, selection, render)

    async def run_loop(self, request, body, selection, render, native=None):
        """Any API's request, as a chat-completions `body`, through the one tool loop, rendered
        by `render` (whose `stream` says whether rounds are streamed). `selection` is
        mcp_selection()'s (servers, allowed, request_servers), or None: no MCP tools, so one
        round. The tool loop: ask the model; run the MCP tools it calls; give it the results;
        ask again, up to mcp_max_rounds. Client tools in a round end the loop (see README).
        `native` (a Native, only where no MCP tools run): the entries opted in to the face's
        API get the client's request as it came, and their answer is relayed."""
        servers, allowed, request_servers = selection or ([], {}, [])
        pool = self.router.pool(body["model"])  # an unknown model: 404 before MCP servers start
        held = []
        try:
            for label, spec in request_servers:
                held.append(await self.mcp.add_from_request(label, spec))
            return await self.mcp_rounds(request, body, servers, allowed, pool, render,
                                         native)
        finally:
            self.mcp.release(held)

    async def mcp_rounds(self, request, body, servers, allowed, pool, render, native=None):
        tools = [t for t in body.get("tools") or () if not (isinstance(t, dict) and
                                                            t.get("type") == "mcp")]
        named = {t.get("server_label") for t in body.get("tools") or ()
                 if isinstance(t, dict) and t.get("type") == "mcp"}
        # a server attached to the model (not named by the request) that fails is left out
        bindings = {b["name"]: b for b in await self.mcp.tools(
            servers, allowed or None, optional=set(servers) - named)} if servers else {}
        clash = [f["name"] for t in tools if isinstance(t, dict) and isinstance(
            f := t.get("function"), dict) and f.get("name") in bindings]
        if clash:
            raise BadRequest(f"The function name {clash[0]!r} is also the name of an MCP tool "
                             "given to this model; rename the function.", param="tools",
                             code="tool_name_conflict")
        client_names = {f["name"] for t in tools if isinstance(t, dict) and isinstance(
            f := t.get(t.get("type") or "function"), dict) and isinstance(f.get("name"), str)}
        state = {"messages": list(body["messages"]), "report": [], "usage": {},
                 "vision": any(up.entry.get("vision") for up, _ in pool),
                 "client_names": client_names, "client_tools": list(tools),
                 "servers": servers, "allowed": allowed or None}
        tools += [b["openai"] for b in bindings.values()]
        base = {k: v for k, v in body.items() if k not in ("tools", "stream", "stream_options")}
        if tools:
            base["tools"] = tools
        else:  # OpenAI refuses "tools": [] (and a tool_choice without tools)
            base.pop("tool_choice", None)
        await self.sender.admit(base["model"], request.conn)  # later rounds hold their slot
        try:
            return await ToolLoop(self, request, base, bindings, state, render.stream,
                                  native).run(render)
        finally:
            self.admission.release()

    async def rebind(self, state, base, bindings):
        """After a round whose calls changed a server's tool list (it sent tools/list_changed,
        as a tool that unlocks others does), the next round is offered the new list; a new
        tool named like one of the client's functions is left out. -> whether it changed."""
        servers = state["servers"]
        if not self.mcp.relist_due(servers):
            return False
        fresh = {b["name"]: b for b in await self.mcp.tools(
            servers, state["allowed"], optional=set(servers))}  # (one failing now: left out)
        bindings.clear()
        bindings.update((name, b) for name, b in fresh.items()
                        if name not in state["client_names"])
        base["tools"] = state["client_tools"] + [b["openai"] for b in bindings.values()]
        if not base["tools"]:  # (as mcp_rounds: OpenAI refuses "tools": [])
            del base["tools"]
            base.pop("tool_choice", None)
        return True

    @staticmethod
    def add_usage(total, usage):
        if not isinstance(usage, dict):  # (an upstream's null, or a shape of its own)
            return
        for key, value in usage.items():
            if isinstance(value, int):
                total[key] = total.get(key, 0) + value

    @staticmethod
    def split_calls(calls, bindings, client_names, number):
        """-> (the calls llmhost answers: its MCP tools' and those of names nobody gave the
        model, which get an error; the client's own calls) of one model answer. Calls without
        an id (some servers omit it) get one: the tool messages must name them."""
        mine, theirs = [], []
        for i, call in enumerate(calls):
            if not isinstance(call, dict):
                continue  # (no call at all: nothing to answer)
            if not call.get("id"):
                call["id"] = f"call_llmhost_{number}_{i}"
            function = call.get("function")
            if not isinstance(function, dict):  # another kind (OpenAI's "custom" calls):
                theirs.append(call)  # the client's
            elif function.get("name") in client_names and \
                    function.get("name") not in bindings:
                theirs.append(call)
            else:
                mine.append(call)
        return mine, theirs

    def extend_conversation(self, state, message, mine, results):
        state["messages"].append(dict(message, tool_calls=mine))
        state["messages"].extend({"role": "tool", "tool_call_id": c.get("id"), "content": r["text"]}
                                 for c, r in zip(mine, results))
        media = [part for r in results for part in r.get("parts", ())[1:]]
        if media and state["vision"]:  # tool messages are text only: images follow as a user turn
            state["messages"].append({"role": "user", "content": [
                {"type": "text", "text": "Images and audio returned by the tool calls above:"}]
                + media})


# =============================================================================
# Responses API
# =============================================================================
# Owns: the Responses face (/v1/responses: create, stream, retrieve, delete, input_items,
# input_tokens): a request translated onto a chat-completions body, the tool loop's events
# rendered as a Response and the stream events the API defines (MCP tool lists, calls and
# approvals included), and stored responses (ResponseStore: SQLite beside the registry).
# Raises: BadRequest / NotFound, in OpenAI's envelope (the Responses API uses it); a stream that
# fails after its head ends with response.failed (the renderer is the request's Face).
# Never: routes, retries or runs tools itself (Application.run_loop does); stores an API key
# (only its hash) or logs a prompt.

# A Responses input part -> the chat part it becomes (None: its text)
_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "summary_text", "reasoning_text"})
# Item types that carry nothing a chat model can be given, skipped as OpenAI's own replay
# items: reasoning (encrypted or not), tool lists, and the calls of tools llmhost never offers.
_SKIPPED_ITEMS = frozenset({
    "reasoning", "mcp_list_tools", "web_search_call", "file_search_call", "computer_call",
    "computer_call_output", "code_interpreter_call", "image_generation_call", "local_shell_call",
    "local_shell_call_output", "custom_tool_call", "custom_tool_call_output", "tool_search_call",
    "tool_search_output", "compaction", "shell_call", "shell_call_output", "apply_patch_call",
    "apply_patch_call_output", "additional_tools"})
NO_RESULT = "(no result was given for this call)"


def new_item_id(prefix):
    """An id as OpenAI's look: prefix, underscore, 48 hex digits."""
    return f"{prefix}_{os.urandom(24).hex()}"


def flat_tool_name(namespace, name):
    """A namespace tool's function as the one name a chat model sees: 'ns__name' (a namespace
    that ends in '__', as Codex names MCP servers', is not doubled), made a valid function
    name as MCP tools' names are."""
    return mcp_tool_name(namespace[:-2] if namespace.endswith("__") else namespace, name, set())


def chat_function(tool, where):
    """A Responses function tool (flat) -> chat's nested form; one in chat's form is kept."""
    if isinstance(tool.get("function"), dict) and "name" not in tool:
        return {"type": "function", "function": tool["function"]}
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"Missing required parameter: '{where}.name'.", param=f"{where}.name",
                         code="missing_required_parameter")
    fn = {"name": name, "parameters": tool.get("parameters") or {"type": "object",
                                                                    "properties": {}}}
    for key in ("description", "strict"):
        if tool.get(key) is not None:
            fn[key] = tool[key]
    return {"type": "function", "function": fn}


def responses_tools(tools):
    """The request's `tools` -> (chat tools, {name the model sees: (namespace, name)}). Function
    tools take chat's nested form, a namespace's functions are offered flat, mcp tools stay
    for mcp_selection; hosted and custom tools (web_search, file_search, custom...) are left
    out: a chat-completions model cannot be given them (a tool_choice forcing one is refused)."""
    if tools is None:
        return [], {}
    if not isinstance(tools, list):
        raise BadRequest("Invalid type for 'tools': expected an array.", param="tools",
                         code="invalid_type")
    chat, names = [], {}
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise BadRequest(f"Invalid type for 'tools[{i}]': expected an object.",
                             param=f"tools[{i}]", code="invalid_type")
        kind = tool.get("type")
        if kind == "function":
            chat.append(chat_function(tool, f"tools[{i}]"))
        elif kind == "mcp":
            chat.append(tool)
        elif kind == "namespace":
            namespace = tool.get("name")
            if not isinstance(namespace, str) or not namespace:
                raise BadRequest(f"Missing required parameter: 'tools[{i}].name'.",
                                 param=f"tools[{i}].name", code="missing_required_parameter")
            inner = tool.get("tools")
            for j, fn in enumerate(inner if isinstance(inner, list) else ()):
                if isinstance(fn, dict) and fn.get("type", "function") == "function":
                    nested = chat_function(fn, f"tools[{i}].tools[{j}]")
                    name = nested["function"]["name"]
                    flat = flat_tool_name(namespace, name)
                    names[flat] = (namespace, name)
                    nested["function"] = dict(nested["function"], name=flat)
                    chat.append(nested)
    return chat, names


def responses_tool_choice(choice, names):
    """The request's tool_choice -> chat's."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict):
        kind = choice.get("type")
        name = choice.get("name")
        if kind == "function" and isinstance(name, str):
            namespace = choice.get("namespace")
            if isinstance(namespace, str) and namespace:
                name = flat_tool_name(namespace, name)
            return {"type": "function", "function": {"name": name}}
        if kind == "mcp" and isinstance(choice.get("server_label"), str):
            if not isinstance(name, str):
                return "required"
            return {"type": "function", "function": {
                "name": mcp_tool_name(choice["server_label"], name, set())}}
        if kind == "allowed_tools" and isinstance(choice.get("tools"), list):
            return {"type": "allowed_tools", "allowed_tools": {
                "mode": choice.get("mode", "auto"), "tools": [
                    {"type": "function", "function": {"name": t["name"]}}
                    for t in choice["tools"] if isinstance(t, dict) and
                    t.get("type") == "function" and isinstance(t.get("name"), str)]}}
    raise BadRequest(f"tool_choice {json.dumps(choice)[:100]} names a tool llmhost cannot give a "
                     "model: use 'auto', 'none', 'required', a function or an mcp server.",
                     param="tool_choice", code="unsupported_value")


def responses_format(text):
    """The request's `text` -> chat's response_format, or None (plain text)."""
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else text
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise BadRequest("Missing required parameter: 'text.format.schema' (a JSON schema "
                             "object).", param="text.format.schema",
                             code="missing_required_parameter")
        schema = {key: fmt[key] for key in ("name", "description", "schema", "strict")
                  if fmt.get(key) is not None}
        schema.setdefault("name", "response")
        return {"type": "json_schema", "json_schema": schema}
    raise BadRequest("Invalid 'text.format': expected an object whose type is 'text', "
                     "'json_object' or 'json_schema'.", param="text.format",
                     code="invalid_value")


def chat_content(content, role, where):
    """A Responses message's content -> chat's: a string (text only), or parts with images
    (input_image's URL or data: URL) and files (input_file's file_data)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"Invalid type for '{where}.content': expected a string or an array.",
                         param=f"{where}.content", code="invalid_type")
    parts = []
    for i, part in enumerate(content):
        at = f"{where}.content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS:
            parts.append({"type": "text", "text": str(part.get("text") or "")})
        elif kind == "refusal":
            parts.append({"type": "text", "text": str(part.get("refusal") or "")})
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                raise BadRequest(f"'{at}': an input_image needs an image_url (a URL or a data: "
                                 "URL); a file_id needs OpenAI's Files API, which llmhost has "
                                 "not.", param=at, code="unsupported_value")
            image = {"url": url}
            if part.get("detail") in ("low", "high"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        elif kind == "input_file":
            if not isinstance(part.get("file_data"), str):
                raise BadRequest(f"'{at}': an input_file needs its file_data (a file_id or "
                                 "file_url needs OpenAI's Files API, which llmhost has not).",
                                 param=at, code="unsupported_value")
            file = {"file_data": part["file_data"]}
            if isinstance(part.get("filename"), str):
                file["filename"] = part["filename"]
            parts.append({"type": "file", "file": file})
        else:
            raise BadRequest(f"'{at}' is {json_kind(part) if kind is None else repr(kind)}, "
                             "not a content part llmhost can give a model (input_text, "
                             "input_image, input_file, output_text).", param=at,
                             code="invalid_value")
    if all(part["type"] == "text" for part in parts):
        # (an assistant's output_text parts are pieces of one text; a user's, paragraphs)
        return ("" if role == "assistant" else "\n\n").join(p["text"] for p in parts)
    return parts


def tool_output_text(output):
    """A function_call_output's output (a string, or content parts) -> a tool message's text."""
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        texts = []
        for part in output:
            if isinstance(part, dict) and part.get("type") in _TEXT_PARTS:
                texts.append(str(part.get("text") or ""))
            elif isinstance(part, dict):
                texts.append(f"[{part.get('type')}: not shown to the model]")
        return "\n".join(texts)
    return "" if output is None else json.dumps(output)


def mcp_call_text(item):
    """What an mcp_call item gave: its output, or its error's text."""
    if isinstance(item.get("output"), str):
        return item["output"]
    error = item.get("error")
    if isinstance(error, dict):
        content = error.get("content")
        text = tool_output_text(content) if isinstance(content, list) else error.get("message")
        return f"Error: {text or json.dumps(error)}"
    return f"Error: {error}" if error else NO_RESULT


def add_call(messages, call):
    """A tool call as the conversation's: joined to the assistant message it follows (text
    and calls are one turn), else in an assistant message of its own."""
    last = messages[-1] if messages else None
    if last is not None and last.get("role") == "assistant":
        last["tool_calls"] = (last.get("tool_calls") or []) + [call]
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def find_call(messages, call_id):
    """-> (the assistant's tool call with this id, whether a tool message answers it)."""
    answered = False
    for message in reversed(messages):
        if message.get("role") == "tool" and message.get("tool_call_id") == call_id:
            answered = True
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict) and call.get("id") == call_id:
                return call, answered
    return None, answered


def responses_messages(items, messages, names=None):
    """Responses items (a request's input, or a response's output) -> chat messages, appended
    to `messages` (the conversation so far: the calls an approval names are found there).
    -> [(call, tool message)]: the MCP calls approved here, whose tool messages wait for the
    loop to run them (an approval whose mcp_call is replayed too takes that call's output)."""
    flat = {pair: name for name, pair in (names or {}).items()}
    approved = []
    replayed = {}  # approval request id -> tool message its replayed mcp_call item fills
    ran = {item.get("approval_request_id") for item in items if isinstance(item, dict) and
           item.get("type") == "mcp_call" and item.get("approval_request_id")}
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"Invalid type for '{where}': expected an object, but got "
                             f"{json_kind(item)} instead.", param=where, code="invalid_type")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise BadRequest(f"Invalid '{where}.role': expected 'user', 'assistant', "
                                 "'system' or 'developer'.", param=f"{where}.role",
                                 code="invalid_value")
            # developer is system to chat templates (OpenAI's own chat API takes both)
            messages.append({"role": "system" if role == "developer" else role,
                             "content": chat_content(item.get("content"), role, where)})
        elif kind == "function_call":
            name, namespace = item.get("name"), item.get("namespace")
            if isinstance(namespace, str) and namespace and isinstance(name, str):
                name = flat.get((namespace, name)) or flat_tool_name(namespace, name)
            if not isinstance(item.get("call_id"), str) or not isinstance(name, str):
                raise BadRequest(f"'{where}': a function_call needs a call_id and a name.",
                                 param=where, code="missing_required_parameter")
            arguments = item.get("arguments")
            add_call(messages, {"id": item["call_id"], "type": "function", "function": {
                "name": name, "arguments": arguments if isinstance(arguments, str) else
                json.dumps(arguments if arguments is not None else {})}})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise BadRequest(f"'{where}': a function_call_output needs a call_id.",
                                 param=where, code="missing_required_parameter")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": tool_output_text(item.get("output"))})
        elif kind in ("mcp_call", "mcp_approval_request"):
            label, name = item.get("server_label"), item.get("name")
            if not all(isinstance(v, str) for v in (label, name, item.get("id"))):
                raise BadRequest(f"'{where}': an {kind} needs an id, a server_label and a "
                                 "name.", param=where, code="missing_required_parameter")
            request_id = item.get("approval_request_id")
            if kind == "mcp_call" and request_id:
                if request_id in replayed:  # the call an approval in this input ran
                    replayed.pop(request_id)["content"] = mcp_call_text(item)
                    continue
                if find_call(messages, request_id)[1]:  # ran when approved: answered there
                    continue
            arguments = item.get("arguments")
            add_call(messages, {"id": item["id"], "type": "function", "function": {
                "name": mcp_tool_name(label, name, set()),
                "arguments": arguments if isinstance(arguments, str) else "{}"}})
            if kind == "mcp_call":
                messages.append({"role": "tool", "tool_call_id": item["id"],
                                 "content": mcp_call_text(item)})
        elif kind == "mcp_approval_response":
            request_id = item.get("approval_request_id")
            call, answered = find_call(messages, request_id)
            if call is None:
                raise BadRequest(f"'{where}': no mcp_approval_request {str(request_id)[:80]!r} "
                                 "in this conversation (continue the response that asked, with "
                                 "previous_response_id, or give the request item before its "
                                 "response).", param=f"{where}.approval_request_id",
                                 code="approval_request_not_found")
            if answered:
                continue  # (an approval given twice runs the call once)
            if item.get("approve") is True:
                message = {"role": "tool", "tool_call_id": request_id, "content": None}
                messages.append(message)
                if request_id in ran:
                    replayed[request_id] = message
                else:
                    approved.append((call, message))
            else:
                reason = item.get("reason")
                messages.append({"role": "tool", "tool_call_id": request_id, "content":
                                 "The user did not approve this tool call" +
                                 (f": {reason}" if isinstance(reason, str) and reason else ".")})
        elif kind == "item_reference":
            raise BadRequest(f"'{where}': item_reference is not supported; give the item "
                             "itself, or previous_response_id.", param=where,
                             code="unsupported_value")
        elif kind not in _SKIPPED_ITEMS:
            raise BadRequest(f"'{where}' has type {kind!r}, which is not an input item "
                             "llmhost knows.", param=f"{where}.type", code="invalid_value")
    for message in replayed.values():
        message["content"] = NO_RESULT
    return approved


def answer_every_call(messages):
    """Chat APIs refuse an assistant's tool call without a tool message after it (an approval
    never answered, a call the client dropped): one saying so is put in its place."""
    i = 0
    while i < len(messages):
        calls = messages[i].get("tool_calls") if messages[i].get("role") == "assistant" else None
        i += 1
        if not calls:
            continue
        answered = set()
        while i < len(messages) and messages[i].get("role") == "tool":
            answered.add(messages[i].get("tool_call_id"))
            i += 1
        missing = [{"role": "tool", "tool_call_id": call.get("id"), "content": NO_RESULT}
                   for call in calls if isinstance(call, dict) and call.get("id") not in answered]
        messages[i:i] = missing
        i += len(missing)


def merged_systems(messages):
    """Adjacent system messages as one (instructions, then Codex's developer message): many
    chat templates take one system message, at the start."""
    out = []
    for message in messages:
        if out and message.get("role") == "system" and out[-1].get("role") == "system" and \
                isinstance(message.get("content"), str) and \
                isinstance(out[-1].get("content"), str):
            out[-1] = dict(out[-1], content=out[-1]["content"] + "\n\n" + message["content"])
        else:
            out.append(message)
    return out


def redacted_tool(tool):
    """A request's tool as its Response echoes (and stores) it: an mcp tool's credentials
    (headers, authorization) are left out, as OpenAI leaves them out."""
    if isinstance(tool, dict) and tool.get("type") == "mcp" and (
            tool.get("headers") or tool.get("authorization")):
        return dict(tool, headers=None, authorization=None)
    return tool


def approval_rules(tools):
    """{server_label: require_approval} of the request's mcp tools; a rule of another shape is
    refused (llmhost's default, as for chat, is "never")."""
    rules = {}
    for i, tool in enumerate(tools or ()):
        if not isinstance(tool, dict) or tool.get("type") != "mcp":
            continue
        rule = tool.get("require_approval", "never")
        valid = rule in ("always", "never") or isinstance(rule, dict) and all(
            key in ("always", "never") and isinstance(value, dict) and
            isinstance(value.get("tool_names", []), list) for key, value in rule.items())
        if not valid:
            raise BadRequest(f"Invalid 'tools[{i}].require_approval': expected 'always', "
                             "'never' or {\"always\"|\"never\": {\"tool_names\": [...]}}.",
                             param=f"tools[{i}].require_approval", code="invalid_value")
        rules[tool.get("server_label")] = rule
    return rules


def stored_items(items):
    """Input items as input_items lists them: each with an id; messages typed, their content
    as parts."""
    out = []
    for item in items:
        item = dict(item)
        if item.get("type", "message" if "role" in item else None) == "message":
            item["type"] = "message"
            if isinstance(item.get("content"), str):
                item["content"] = [{"type": "output_text", "text": item["content"],
                                    "annotations": []} if item.get("role") == "assistant" else
                                   {"type": "input_text", "text": item["content"]}]
            item.setdefault("status", "completed")
        item.setdefault("id", new_item_id({"message": "msg", "function_call": "fc",
                                           "function_call_output": "fco"}.get(
                                               item.get("type"), "item")))
        out.append(item)
    return out


def responses_usage(usage):
    """Chat usage (summed over the loop's rounds) -> a Response's, with the detail objects the
    SDKs' types require; None when the upstream said nothing."""
    if not usage:
        return None
    given = usage.get("prompt_tokens", 0)
    made = usage.get("completion_tokens", 0)
    return {"input_tokens": given, "input_tokens_details": {"cached_tokens": 0,
                                                            "cache_write_tokens": 0},
            "output_tokens": made, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.get("total_tokens", given + made)}


class ResponseStore:
    """Stored responses, in one SQLite file beside the registry (mode 0600), shared by every
    worker of a serve and every restart: WAL (readers never wait for a writer), each statement
    its own short transaction, a busy timeout for the moment another worker writes. A row is
    the Response, its input items, the conversation as chat messages (previous_response_id
    continues it: one read, whatever the chain's length) and a hash of the API key that made it.
    Rows older than max_age or past the max_count newest are pruned. Every call runs on a
    thread of the store's own, so the event loop never waits for the disk or a lock."""

    def __init__(self, path, max_age=RESPONSES_MAX_AGE, max_count=RESPONSES_MAX_COUNT,
                 prune_saves=RESPONSES_PRUNE_SAVES):
        self.path = path
        self.max_age = max_age
        self.max_count = max_count
        self.prune_saves = prune_saves
        self.executor = None  # made on first use (a worker's own, never inherited)
        self.db = None
        self.next_prune = 0.0
        self.saves = 0

    async def call(self, fn, *args):
        import asyncio
        if self.executor is None:
            from concurrent.futures import ThreadPoolExecutor
            self.executor = ThreadPoolExecutor(1, thread_name_prefix="llmhost-responses")
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def close(self):
        if self.executor is not None:
            self.executor.submit(self._close)
            self.executor.shutdown(wait=True)
            self.executor = None

    def _close(self):
        if self.db is not None:
            self.db.close()
            self.db = None

    def _open(self):
        if self.db is None:
            import sqlite3
            # Made 0600 before SQLite opens it: prompts are in it (its -wal and -shm files
            # take the database file's mode).
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_mode & 0o077:
                    os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
            db = sqlite3.connect(self.path, timeout=RESPONSES_BUSY_TIMEOUT,
                                 isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # (WAL: a crash loses no committed row)
            db.execute("CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, owner TEXT "
                       "NOT NULL, created REAL NOT NULL, response TEXT NOT NULL, input TEXT NOT "
                       "NULL, context TEXT NOT NULL)")
            db.execute("CREATE INDEX IF NOT EXISTS responses_created ON responses (created)")
            self.db = db
        return self.db

    def _save(self, rid, owner, response, items, context):
        db = self._open()
        now = time.time()
        db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)", (
            rid, owner, now, json_bytes(response).decode(), json_bytes(items).decode(),
            json_bytes(context).decode()))
        self.saves += 1
        if now >= self.next_prune or self.saves % self.prune_saves == 0:
            self.next_prune = now + RESPONSES_PRUNE_INTERVAL
            db.execute("DELETE FROM responses WHERE created < ?", (now - self.max_age,))
            db.execute("DELETE FROM responses WHERE id IN (SELECT id FROM responses ORDER BY "
                       "created DESC LIMIT -1 OFFSET ?)", (self.max_count,))

    def _row(self, rid, owner, column):
        row = self._open().execute(f"SELECT owner, created, {column} FROM responses WHERE id = ?",
                                   (rid,)).fetchone()
        if row is None or row[1] < time.time() - self.max_age or not owns(owner, row[0]):
            return None
        return row[2]

    def _delete(self, rid, owner):
        if self._row(rid, owner, "id") is None:
            return False
        self._open().execute("DELETE FROM responses WHERE id = ?", (rid,))
        return True

    async def save(self, rid, owner, response, items, context):
        await self.call(self._save, rid, owner, response, items, context)

    async def get(self, rid, owner, column):
        """-> the JSON text of `column` (response, input or context) of the response `rid` if
        it is there, unexpired, and `owner`'s to see; else None."""
        return await self.call(self._row, rid, owner, column)

    async def delete(self, rid, owner):
        return await self.call(self._delete, rid, owner)


def owns(owner, row_owner):
    """Whether a caller (the hash of its key; "" when serve has no keys) may see a response
    stored by `row_owner` ("" when it was stored with no keys: anyone)."""
    import hmac
    return not owner or not row_owner or hmac.compare_digest(owner, row_owner)


# A Response as json_bytes makes it (ResponsesRender.response_json): id, created_at, status,
# error, incomplete_details, the echo before "output", output, the echo between, usage, the
# echo after, and completed_at's member if it has one.
RESPONSE_JSON = ('{"id":"%s","object":"response","created_at":%d,"status":"%s",'
                 '"background":false,"error":%s,"incomplete_details":%s,%s,"output":%s,%s,'
                 '"usage":%s,%s%s}')
# An event that carries a Response (kind, kind, the Response, sequence number)
RESPONSE_EVENT = b'event: %s\ndata: {"type":"%s","response":%s,"sequence_number":%d}\n\n'
# (the head: item id, output_index; then the text; the tail: sequence number)
TEXT_DELTA_HEAD = (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
                   b'"item_id":"%s","output_index":%d,"content_index":0,"delta":')
TEXT_DELTA_TAIL = b',"logprobs":[],"sequence_number":%d}\n\n'
# A message item's events before its first text and after its last, as event() makes them,
# field for field: (output_index, item id, sequence number, item id, output_index, number).
MESSAGE_ADDED_EVENTS = (
    b'event: response.output_item.added\ndata: {"type":"response.output_item.added",'
    b'"output_index":%d,"item":{"id":"%s","type":"message","role":"assistant",'
    b'"status":"in_progress","content":[]},"sequence_number":%d}\n\n'
    b'event: response.content_part.added\ndata: {"type":"response.content_part.added",'
    b'"item_id":"%s","output_index":%d,"content_index":0,"part":{"type":"output_text",'
    b'"text":"","annotations":[]},"sequence_number":%d}\n\n')
# (item id, output_index, text, number; item id, output_index, text, number; output_index,
# the item (MESSAGE_ITEM_JSON), number)
MESSAGE_DONE_EVENTS = (
    b'event: response.output_text.done\ndata: {"type":"response.output_text.done",'
    b'"item_id":"%s","output_index":%d,"content_index":0,"text":%s,"logprobs":[],'
    b'"sequence_number":%d}\n\n'
    b'event: response.content_part.done\ndata: {"type":"response.content_part.done",'
    b'"item_id":"%s","output_index":%d,"content_index":0,"part":{"type":"output_text",'
    b'"text":%s,"annotations":[]},"sequence_number":%d}\n\n'
    b'event: response.output_item.done\ndata: {"type":"response.output_item.done",'
    b'"output_index":%d,"item":%s,"sequence_number":%d}\n\n')
# A message item, done (item id, status, text)
MESSAGE_ITEM_JSON = (b'{"id":"%s","type":"message","role":"assistant","status":"%s",'
                     b'"content":[{"type":"output_text","text":%s,"annotations":[]}]}')


class ResponsesRender(Render, Face):
    """The tool loop rendered as a Response: output items made as the loop goes, and when the
    client streams, each told as the API's events (sequence_number counting from
    response.created). finished() and approval() only make the Response (`final`); the face
    stores it, then deliver() sends it. As the request's Face it ends a failed stream with
    response.failed, which carries the output so far."""

    def __init__(self, request, body, rid, stream, *, rounds, names, rules, approved, store):
        self.request = request
        self.conn = request.conn
        self.body = body  # the client's
        self.id = rid
        self.stream = stream
        self.rounds = rounds
        self.names = names  # name the model sees -> (namespace, name) of a namespace's function
        self.rules = rules  # server label -> its require_approval
        self.approved_calls = approved  # [(call, tool message)] approved in this request
        self.store = store
        self.created = int(time.time())
        self.output = []
        self.where = {}  # item id -> its output_index
        self.item = None  # the message or reasoning item whose text is streaming
        self.delta_head = None  # its text deltas' template head (a message streamed)
        self.pieces = []  # its text so far
        self.bindings = {}
        self.running = []  # the mcp_call items of the calls running
        self.marks = []  # (not streamed) where each round's MCP calls begin in `output`
        self.seq = 0
        self.started = False
        self.held = []  # events told before the stream began (tool lists, approved calls)
        self.final = None
        self.keep_alive = True
        self.items_json = {}  # item id -> its JSON, of the items a template encoded whole
        self.echoed = None  # echo()'s runs, made with the first Response (once the upstream
        self.echoed_json = None  # is asked), and encoded (response_json)

    # -- the Response and its events ---------------------------------------------------------
    def echo(self):
        """The Response's fields that echo the request (and `store`), in the Response's order:
        the runs before "output", between it and "usage", and after "usage"."""
        if self.echoed is not None:
            return self.echoed
        body = self.body
        before = {"instructions": body.get("instructions"),
                  "max_output_tokens": body.get("max_output_tokens"), "model": body["model"]}
        between = {"parallel_tool_calls": body.get("parallel_tool_calls") is not False,
                   "previous_response_id": body.get("previous_response_id"),
                   "reasoning": body["reasoning"] if isinstance(body.get("reasoning"), dict)
                   else {"effort": None, "summary": None},
                   "store": self.store, "temperature": body.get("temperature"),
                   "text": body["text"] if isinstance(body.get("text"), dict)
                   else {"format": {"type": "text"}},
                   "tool_choice": body.get("tool_choice") or "auto",
                   "tools": [redacted_tool(tool) for tool in body.get("tools") or ()],
                   "top_p": body.get("top_p"), "truncation": "disabled"}
        after = {"user": body.get("user"), "metadata": body.get("metadata") or {}}
        self.echoed = before, between, after
        return self.echoed

    def response(self, status, output, usage=None, error=None, incomplete=None):
        before, between, after = self.echo()
        doc = {"id": self.id, "object": "response", "created_at": self.created,
               "status": status, "background": False, "error": error,
               "incomplete_details": incomplete, **before, "output": output, **between,
               "usage": usage, **after}
        if status in ("completed", "incomplete"):
            doc["completed_at"] = int(time.time())
        return doc

    def response_json(self, doc=None):
        """json_bytes(doc) for a `doc` response() made (None: response("in_progress", []), a
        stream's first): the echo, which a stream's Responses share (response.created,
        .in_progress, .completed), is encoded once, the rest spliced around it. A lone
        surrogate anywhere (no UTF-8: json_bytes escapes the whole Response then) takes
        json_bytes itself."""
        if self.echoed_json is None:
            self.echoed_json = [_JSON_UTF8(run)[1:-1] for run in self.echo()]
        before, between, after = self.echoed_json
        if doc is None:
            fields = "in_progress", "null", "null", before, "[]", between, "null", after, ""
        else:
            completed = doc.get("completed_at")
            fields = (doc["status"], _JSON_UTF8(doc["error"]),
                      _JSON_UTF8(doc["incomplete_details"]), before,
                      self.output_json(doc["output"]),
                      between, _JSON_UTF8(doc["usage"]), after,
                      "" if completed is None else f',"completed_at":{completed}')
        try:
            return (RESPONSE_JSON % (self.id, self.created, *fields)).encode()
        except UnicodeEncodeError:
            return json_bytes(self.response("in_progress", []) if doc is None else doc)

    def output_json(self, output):
        """_JSON_UTF8(output), of the JSON close_item made of its items (a streamed message,
        not changed since) when it made all of them."""
        known = [self.items_json.get(item["id"]) for item in output]
        if not known or None in known:
            return _JSON_UTF8(output)
        return "[" + ",".join(known) + "]"

    def event(self, kind, fields):
        doc = {"type": kind, **fields, "sequence_number": self.seq}
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + json_bytes(doc) + b"\n\n"

    def emit(self, kind, **fields):
        if not self.stream:
            return
        if not self.started:  # (a copy: the items change before the stream begins)
            self.held.append((kind, json_loads(json_bytes(fields))))
        elif not self.conn.gone:
            self.conn.write_chunk(self.event(kind, fields))

    def place(self, item):
        """Put `item` at the end of the output -> its output_index."""
        index = self.where[item["id"]] = len(self.output)
        self.output.append(item)
        return index

    def add(self, item):
        self.emit("response.output_item.added", output_index=self.place(item), item=item)

    def done(self, item):
        self.emit("response.output_item.done", output_index=self.where[item["id"]], item=item)

    def at(self, item, **fields):
        return dict(item_id=item["id"], output_index=self.where[item["id"]], **fields)

    # -- streamed text -------------------------------------------------------------------------
    def templated(self):
        """Whether the events go out now (streamed, begun, the client there): the frequent
        ones are then written from a template, not built and encoded as dicts."""
        return self.stream and self.started and not self.conn.gone

    def open_item(self, item, part):
        self.item, self.pieces = item, []
        if item["type"] == "message" and self.templated():
            index = self.place(item)
            rid = item["id"].encode()
            self.conn.write_chunk(MESSAGE_ADDED_EVENTS % (index, rid, self.seq, rid, index,
                                                          self.seq + 1))
            self.seq += 2
            self.delta_head = TEXT_DELTA_HEAD % (rid, index)
            return
        self.add(item)
        self.emit("response.content_part.added", **self.at(item, content_index=0, part=part))

    def close_item(self, status="completed"):
        item, self.item, self.delta_head = self.item, None, None
        if item is None:
            return
        text = "".join(self.pieces)
        if item["type"] == "message" and self.templated():
            part = {"type": "output_text", "text": text, "annotations": []}
            item.update(content=[part], status=status)
            rid, index, seq = item["id"].encode(), self.where[item["id"]], self.seq
            try:
                encoded, utf8 = _JSON_STRING(text).encode(), True
            except UnicodeEncodeError:  # (a lone surrogate: escaped, as json_bytes does)
                encoded, utf8 = json_bytes(text), False
            whole = MESSAGE_ITEM_JSON % (rid, status.encode(), encoded)
            self.conn.write_chunk(MESSAGE_DONE_EVENTS % (
                rid, index, encoded, seq, rid, index, encoded, seq + 1, index, whole, seq + 2))
            self.seq += 3
            if utf8:  # (the final Response's output is spliced from it: response_json)
                self.items_json[item["id"]] = whole.decode()
            return
        if item["type"] == "message":
            part = {"type": "output_text", "text": text, "annotations": []}
            self.emit("response.output_text.done", **self.at(item, content_index=0, text=text,
                                                               logprobs=[]))
        else:
            part = {"type": "reasoning_text", "text": text}
            self.emit("response.reasoning_text.done", **self.at(item, content_index=0,
                                                                  text=text))
        self.emit("response.content_part.done", **self.at(item, content_index=0, part=part))
        item.update(content=[part], status=status)
        self.done(item)

    def text(self, text, reasoning=False):
        if self.delta_head is not None and not reasoning and not self.conn.gone:
            # The event a stream has most of, written from a template: what event() would
            # make, field for field, without building and encoding a dict per token.
            self.pieces.append(text)
            self.conn.write_chunk(self.delta_head + json_bytes(text) + TEXT_DELTA_TAIL % self.seq)
            self.seq += 1
            return
        kind = "reasoning" if reasoning else "message"
        if self.item is None or self.item["type"] != kind:
            self.close_item()
            if reasoning:
                self.open_item({"id": new_item_id("rs"), "type": "reasoning", "summary": [],
                                "content": [], "status": "in_progress"},
                               {"type": "reasoning_text", "text": ""})
            else:
                # A later round's text comes set apart from the earlier one's (the loop joins
                # chat's answer so); here it is a message of its own.
                if text.startswith(ROUND_SEPARATOR) and any(
                        item["type"] == "message" for item in self.output):
                    text = text[len(ROUND_SEPARATOR):]
                    if not text:
                        return
                self.open_item({"id": new_item_id("msg"), "type": "message",
                                "role": "assistant", "status": "in_progress", "content": []},
                               {"type": "output_text", "text": "", "annotations": []})
        if self.delta_head is not None and not self.conn.gone:  # (a message just opened)
            return self.text(text)
        self.pieces.append(text)
        self.emit("response.reasoning_text.delta" if reasoning else
                  "response.output_text.delta", **self.at(
                      self.item, content_index=0, delta=text,
                      **({} if reasoning else {"logprobs": []})))

    def whole_text(self, text, reasoning=False, status="completed"):
        """A text not streamed, as the item it makes."""
        if reasoning:
            return {"id": new_item_id("rs"), "type": "reasoning", "summary": [],
                    "content": [{"type": "reasoning_text", "text": text}], "status": status}
        return {"id": new_item_id("msg"), "type": "message", "role": "assistant",
                "status": status, "content": [{"type": "output_text", "text": text,
                                               "annotations": []}]}

    # -- the tool loop's events ----------------------------------------------------------------
    def opened(self, up):
        if self.started:
            return
        self.started = True
        self.keep_alive = self.conn.start_stream(self.request, 200, [
            ("Content-Type", "text/event-stream"),
            ("X-Llmhost-Server", up.name if up is not None else "-")] + SSE_HEADERS)
        self.request.status = 200
        snapshot = self.response_json()  # (once for both)
        head = b""
        for kind in (b"response.created", b"response.in_progress"):
            head += RESPONSE_EVENT % (kind, kind, snapshot, self.seq)
            self.seq += 1
        for kind, fields in self.held:
            head += self.event(kind, fields)
        self.held = []
        self.conn.write_chunk(head)

    def delta(self, doc, text, reasoning):
        if isinstance(reasoning, str) and reasoning:
            self.text(reasoning, reasoning=True)
        if isinstance(text, str) and text:
            self.text(text)

    def tools(self, bindings):
        self.bindings = bindings  # (the loop's own dict, kept up to date)
        self.close_item()
        servers = {}
        for binding in bindings.values():
            fn = binding["openai"]["function"]
            servers.setdefault(binding["server"], []).append({
                "name": binding["tool"], "description": fn.get("description"),
                "input_schema": fn.get("parameters"), "annotations": None})
        for server, tools in servers.items():
            item = {"id": new_item_id("mcpl"), "type": "mcp_list_tools", "server_label": server,
                    "tools": []}
            self.add(item)
            self.emit("response.mcp_list_tools.in_progress", **self.at(item))
            item["tools"] = tools
            self.emit("response.mcp_list_tools.completed", **self.at(item))
            self.done(item)

    def mcp_item(self, call, kind):
        fn = call["function"]
        binding = self.bindings.get(fn.get("name")) or {}
        arguments = fn.get("arguments")
        item = {"id": new_item_id("mcpr" if kind == "mcp_approval_request" else "mcp"),
                "type": kind, "server_label": binding.get("server", ""),
                "name": binding.get("tool", fn.get("name") or ""),
                "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}
        return item

    def calls(self, calls):
        self.close_item()
        resumed = any(call is first for first, _ in self.approved_calls for call in calls)
        if not resumed:  # (approved calls run before the first round: no round's)
            self.marks.append(len(self.output))
        for call in calls:
            item = self.mcp_item(call, "mcp_call")
            item.update(status="in_progress", output=None, error=None)
            if resumed:
                item["approval_request_id"] = call.get("id")
            self.add(item)
            self.emit("response.mcp_call_arguments.delta", **self.at(item,
                                                                    delta=item["arguments"]))
            self.emit("response.mcp_call_arguments.done", **self.at(
                item, arguments=item["arguments"]))
            self.emit("response.mcp_call.in_progress", **self.at(item))
            self.running.append(item)

    def results(self, calls, results):
        for item, result in zip(self.running, results):
            if result["ok"]:
                item.update(status="completed", output=result["text"])
            else:
                item.update(status="failed", error={"type": "mcp_tool_execution_error",
                                                    "content": [{"type": "text",
                                                                 "text": result["text"]}]})
            self.emit("response.mcp_call.completed" if result["ok"] else
                      "response.mcp_call.failed", **self.at(item))
            self.done(item)
        self.running = []

    def waiting(self):  # an SSE comment: clients ignore it, proxies see traffic
        if self.started and not self.conn.gone:
            self.conn.write_chunk(b": llmhost: running tools\n\n")

    def approved(self):
        return self.approved_calls

    def needs_approval(self, binding):
        if binding is None:  # (a tool nobody gave: the model is told so, nothing runs)
            return False
        rule = self.rules.get(binding["server"], "never")
        if not isinstance(rule, dict):
            return rule == "always"
        for verdict in ("always", "never"):
            if binding["tool"] in (rule.get(verdict) or {}).get("tool_names", ()):
                return verdict == "always"
        return True  # a tool the filter does not name asks, as at OpenAI

    def refused(self, status, body, retry_after):
        if status == 200:  # a 200 that is no chat completion: nothing to render it from
            raise UpstreamError("upstream answered with something that is not a chat "
                                "completion", code="upstream_format")
        if not self.started:
            return answer_as_is(self.request, status, body, retry_after)
        message, _ = upstream_error_message(status, body)
        self.conn.end_stream(self.failed(f"upstream: {message}"))
        return self.keep_alive

    def end_items(self, end, status):
        """Close the item streaming; not streamed, place each round's text (before its MCP
        calls) and the last round's reasoning; the note when the rounds ran out."""
        self.close_item(status)
        if not self.stream:
            texts = end.texts
            marks = self.marks if len(self.marks) >= len(texts) else \
                self.marks + [len(self.output)]
            reasoning = (end.message or {}).get("reasoning_content")
            for k in reversed(range(len(texts))):
                new = []
                if k == len(texts) - 1 and isinstance(reasoning, str) and reasoning:
                    new.append(self.whole_text(reasoning, reasoning=True))
                if isinstance(texts[k], str) and texts[k]:
                    new.append(self.whole_text(texts[k], status=status))
                self.output[marks[k]:marks[k]] = new
        if end.exhausted:
            note = exhausted_note(self.rounds)
            if self.stream:
                self.text(note)
                self.close_item(status)
            elif self.output and self.output[-1]["type"] == "message":
                part = self.output[-1]["content"][0]
                part["text"] = (part["text"] + note).strip()
            else:
                self.output.append(self.whole_text(note.strip(), status=status))

    def finished(self, end):
        length = end.finish_reason() == "length"
        status = "incomplete" if length else "completed"
        self.end_items(end, status)
        for call in end.client_calls or ():
            fn = call.get("function")
            if not isinstance(fn, dict):
                continue  # (a kind of call no tool of ours could have asked for)
            arguments = fn.get("arguments")
            arguments = arguments if isinstance(arguments, str) else json.dumps(arguments)
            item = {"id": new_item_id("fc"), "type": "function_call", "status": "in_progress",
                    "call_id": call.get("id") or new_item_id("call"),
                    "name": fn.get("name") or "", "arguments": ""}
            if item["name"] in self.names:
                item["namespace"], item["name"] = self.names[item["name"]]
            self.add(item)
            if arguments:
                self.emit("response.function_call_arguments.delta", **self.at(item,
                                                                             delta=arguments))
            self.emit("response.function_call_arguments.done", **self.at(item,
                                                                        arguments=arguments))
            item.update(arguments=arguments, status="completed")
            self.done(item)
        self.final = self.response(status, self.output, responses_usage(end.usage),
                                   incomplete={"reason": "max_output_tokens"} if length else None)

    def approval(self, end, calls):
        self.end_items(end, "completed")
        for call in calls:
            item = self.mcp_item(call, "mcp_approval_request")
            self.add(item)
            self.done(item)
        self.final = self.response("completed", self.output, responses_usage(end.usage))

    def deliver(self):
        """Send the Response the loop ended on (stored by now, if it is to be)."""
        conn, doc = self.conn, self.final
        if conn.gone:
            return False
        self.request.status = 200
        if not self.stream:
            return conn.respond(self.request, 200, JSON_TYPE + [
                ("X-Llmhost-Server", self.request.server or "-")], json_bytes(doc))
        if not self.started:
            self.opened(None)
        kind = b"response.incomplete" if doc["status"] == "incomplete" else \
            b"response.completed"
        conn.end_stream(RESPONSE_EVENT % (kind, kind, self.response_json(doc), self.seq))
        self.seq += 1
        return self.keep_alive

    # -- as the request's Face -----------------------------------------------------------------
    def failed(self, message):
        return self.event("response.failed", {"response": self.response(
            "failed", self.output, error={"code": "server_error", "message": message})})

    def error_event(self, exc):
        return self.failed(exc.message)


class ResponsesRelayFace(Face):
    """A Responses stream an entry's own /responses gave ("native"), relayed: it ends at
    response.completed (or .incomplete, .failed); one that dies is ended with the API's error
    event, numbered after the last event relayed."""

    def stream_ended(self, data):
        return b"response.completed" in data or b"response.incomplete" in data or \
            b"response.failed" in data

    def stream_error(self, exc, last):
        numbers = re.findall(rb'"sequence_number"\s*:\s*(\d+)', last)
        return b"event: error\n" + sse_event({
            "type": "error", "code": exc.code or "server_error", "message": exc.message,
            "param": None, "sequence_number": max(map(int, numbers)) + 1 if numbers else 0})

    def error_event(self, exc):
        return self.stream_error(exc, b"")


RESPONSES_RELAY_FACE = ResponsesRelayFace()


class ResponsesAPI:
    """The Responses routes of an Application; `store` is a ResponseStore, or None when serve
    keeps nothing (--no-store)."""

    def __init__(self, app, store):
        self.app = app
        self.store = store

    def mount(self):
        app = self.app
        app.routes["/v1/responses"] = {"POST": self.create}
        app.routes["/v1/responses/input_tokens"] = {"POST": self.input_tokens}
        app.prefix_routes.append(("/v1/responses/", {"GET": self.retrieve,
                                                     "DELETE": self.delete}))

    def close(self):
        if self.store is not None:
            self.store.close()

    def owner(self, request):
        """The hash of the request's API key ("" when serve has none): whose its responses are."""
        if not self.app.api_keys:
            return ""
        import hashlib
        key = check_api_key(request.headers, self.app.api_keys)
        return hashlib.sha256(b"llmhost responses\0" +
                              key.encode("utf-8", "surrogateescape")).hexdigest()

    async def translate(self, request, body):
        """A Responses body -> (chat body, the conversation it continues + its input as chat
        messages, how many of those are instructions, the input items, namespace names,
        approved calls)."""
        for field, kinds, what in (("instructions", (str, list), "a string or an array"),
                                   ("input", (str, list), "a string or an array"),
                                   ("previous_response_id", str, "a string"),
                                   ("metadata", dict, "an object")):
            if body.get(field) is not None and not isinstance(body[field], kinds):
                raise BadRequest(f"Invalid type for '{field}': expected {what}, but got "
                                 f"{json_kind(body[field])} instead.", param=field,
                                 code="invalid_type")
        for field in ("conversation", "prompt"):
            if body.get(field) is not None:
                raise BadRequest(f"'{field}' needs OpenAI's own stored objects, which llmhost "
                                 "has not: give the conversation as input, or "
                                 "previous_response_id.", param=field, code="unsupported_value")
        if any(not isinstance(v, str) for v in (body.get("metadata") or {}).values()):
            raise BadRequest("Invalid 'metadata': its values must be strings.", param="metadata",
                             code="invalid_type")
        tools, names = responses_tools(body.get("tools"))
        messages = []
        instructions = body.get("instructions")
        if isinstance(instructions, str) and instructions:
            messages.append({"role": "system", "content": instructions})
        elif isinstance(instructions, list):
            responses_messages(instructions, messages, names)
        head = len(messages)  # (instructions are not carried to a continuation, as at OpenAI)
        previous = body.get("previous_response_id")
        if previous is not None:
            messages.extend(await self.context(request, previous))
        given = body.get("input")
        items = [{"type": "message", "role": "user", "content": given}] \
            if isinstance(given, str) else given or []
        approved = responses_messages(items, messages, names)
        answer_every_call(messages)
        if len(messages) == head:
            raise BadRequest("Missing required parameter: 'input'.", param="input",
                             code="missing_required_parameter")
        chat = {"model": body["model"], "messages": merged_systems(messages)}
        if tools:
            chat["tools"] = tools
            choice = responses_tool_choice(body.get("tool_choice"), names)
            if choice is not None:
                chat["tool_choice"] = choice
            if isinstance(body.get("parallel_tool_calls"), bool):
                chat["parallel_tool_calls"] = body["parallel_tool_calls"]
        response_format = responses_format(body.get("text"))
        if response_format is not None:
            chat["response_format"] = response_format
        if body.get("max_output_tokens") is not None:
            chat["max_tokens"] = body["max_output_tokens"]
        for field in ("temperature", "top_p"):
            if body.get(field) is not None:
                chat[field] = body[field]
        return chat, messages, head, items, names, approved

    async def context(self, request, previous):
        """The conversation a previous_response_id names, as chat messages."""
        if self.store is None:
            raise BadRequest("This llmhost keeps no responses (serve --no-store), so "
                             "previous_response_id cannot be used: send the whole conversation "
                             "as input.", param="previous_response_id",
                             code="previous_response_not_found")
        text = await self.store_call(self.store.get(previous, self.owner(request), "context"))
        if text is None:
            raise BadRequest(f"Previous response with id '{previous[:100]}' not found.",
                             param="previous_response_id", code="previous_response_not_found")
        return json_loads(text)

    @staticmethod
    async def store_call(coro):
        import sqlite3
        try:
            return await coro
        except sqlite3.Error as exc:
            raise ServiceUnavailable(f"the response store failed: {exc}",
                                     code="store_unavailable") from None

    async def create(self, request):
        body = parse_json_body(request, "responses")
        app = self.app
        native = await self.native(request, body)
        if native is not None and native.only:  # state only such an upstream has: no
            return (await app.forward(request, body, None, native=native)).keep_alive
        store = self.store is not None and body.get("store") is not False
        chat, messages, head, items, names, approved = await self.translate(request, body)
        selection = app.mcp_selection(chat, approvals=True)
        render = ResponsesRender(request, body, new_item_id("resp"), body.get("stream") is True,
                                 rounds=app.mcp_max_rounds, names=names,
                                 rules=approval_rules(body.get("tools")), approved=approved,
                                 store=store)
        request.face = render  # (a stream that fails ends with response.failed)
        keep_alive = await app.run_loop(request, chat, selection, render,
                                        None if selection else native)
        if render.final is None:  # refused, or relayed natively: answered already
            return keep_alive
        if store:
            conversation = messages[head:]
            responses_messages(render.final["output"], conversation, names)
            try:
                await self.store.save(render.id, self.owner(request), render.final,
                                      stored_items(items), conversation)
            except Exception as exc:  # (sqlite3.Error, OSError): the answer still goes out
                logger().warning("response %s not stored: %s", render.id, exc)
        return render.deliver()

    async def native(self, request, body):
        """A Native for a request that an entry of its model opted in to "responses" may take
        as it came, or None: none is, or llmhost runs tools for it (its MCP tools, attached or
        named), or it continues a response llmhost made (previous_response_id of its store).
        A response relayed so is the upstream's, which keeps it (llmhost stores none): a
        request that names one llmhost does not know (or a conversation or prompt object,
        OpenAI's own) is for such entries `only`."""
        app = self.app
        if not any("responses" in up.native for up, _ in app.router.pool(body["model"])) or \
                app.mcp_selection({"model": body["model"], "tools": body.get("tools")},
                                  approvals=True):
            return None
        previous = body.get("previous_response_id")
        if isinstance(previous, str) and self.store is not None and await self.store_call(
                self.store.get(previous, self.owner(request), "id")) is not None:
            return None
        only = isinstance(previous, str) or any(body.get(field) is not None
                                           for field in ("conversation", "prompt"))
        return app.native_relay(request, "responses", body, RESPONSES_RELAY_FACE, only)

    async def input_tokens(self, request):
        """POST /v1/responses/input_tokens: an estimate (a token per 4 characters): the
        upstreams' chat-completions API has no way to count a chat's tokens."""
        body = parse_json_body(request, "responses")
        self.app.router.pool(body["model"])  # (an unknown model: 404)
        chat = (await self.translate(request, body))[0]
        tokens = estimate_tokens(chat, IMAGE_TOKENS_OPENAI)
        return self.app.reply_json(request, {"object": "response.input_tokens",
                                             "input_tokens": tokens, "estimated": True})

    async def retrieve(self, request, rest):
        """GET /v1/responses/{id} and /v1/responses/{id}/input_items."""
        from urllib.parse import parse_qs, unquote
        rid, _, what = rest.partition("/")
        rid = unquote(rid)
        if what not in ("", "input_items"):
            raise NotFound(f"Unknown path {request.path!r}.")
        text = await self.stored(request, rid, "input" if what else "response")
        if not what:
            request.status = 200
            return request.conn.respond(request, 200, JSON_TYPE, text.encode())
        query = {k: v[-1] for k, v in parse_qs(request.query).items()}
        order = query.get("order", "desc")
        try:
            limit = int(query.get("limit", 20))
        except ValueError:
            limit = 0
        if order not in ("asc", "desc") or not 1 <= limit <= RESPONSES_LIST_MAX:
            raise BadRequest(f"input_items takes order=asc|desc and limit=1..{RESPONSES_LIST_MAX}.",
                             code="invalid_value")
        items = json_loads(text)
        if order == "desc":
            items.reverse()
        after = query.get("after")
        if after is not None:
            ids = [item.get("id") for item in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        page = items[:limit]
        return self.app.reply_json(request, {
            "object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})

    async def delete(self, request, rest):
        from urllib.parse import unquote
        rid = unquote(rest)
        await self.stored(request, rid, "id")
        await self.store_call(self.store.delete(rid, self.owner(request)))
        return self.app.reply_json(request, {"id": rid, "object": "response", "deleted": True})

    async def stored(self, request, rid, column):
        if self.store is None:
            raise NotFound(f"Response with id '{rid[:100]}' not found: this llmhost keeps no "
                           "responses (serve --no-store).")
        text = await self.store_call(self.store.get(rid, self.owner(request), column))
        if text is None:
            raise NotFound(f"Response with id '{rid[:100]}' not found.")
        return text


# =============================================================================
# Serve
# =============================================================================
# Owns: a running gateway's life: the Gateway (its sockets, the registry it watches and
# reloads, zero-config discovery, MCP hub and managed servers), one worker process or a
# supervisor of several (--workers), their signals, and the record beside the registry that
# tells the other commands where serve listens.
# Raises: CLIError for what stops serve from starting; RegistryError from a reload is logged.
# Never: parses arguments (the CLI's cmd_serve does) nor reads the environment itself.


def http_connection(parts, timeout):
    """A standard-library client connection for a split http(s) URL."""
    import http.client
    if parts.scheme == "https":
        import ssl
        return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                           context=ssl.create_default_context())
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def http_json(url, api_key=None, timeout=None, method="GET"):
    """`method` `url` (no body) with the standard library's client -> (status, parsed JSON or
    None, raw text). Raises CLIError saying what was tried when nothing usable came back."""
    import http.client
    import socket
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    timeout = PROBE_TIMEOUT if timeout is None else timeout
    conn = http_connection(parts, timeout)
    headers = {"Accept": "application/json", "User-Agent": f"llmhost/{__version__}"}
    if api_key:
        # UTF-8, as curl sends it (http.client would send latin-1, and fail on a key beyond it).
        headers["Authorization"] = b"Bearer " + api_key.encode("utf-8", "surrogateescape")
    try:
        # (http.client asks for Accept-Encoding: identity itself; one that encodes anyway is
        # decoded below, as fetch_json does)
        conn.request(method, (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                     body=None if method == "GET" else b"", headers=headers)
        resp = conn.getresponse()
        raw = resp.read(MAX_UPSTREAM_BODY)
        raw = decode_content(raw, ", ".join(resp.headers.get_all("content-encoding") or ())
                             .lower())
    except UpstreamError as exc:
        raise CLIError(f"{method} {url}: {exc.message}") from None
    except socket.timeout:
        raise CLIError(f"{method} {url}: no answer within {timeout:g}s") from None
    except ConnectionRefusedError:
        raise CLIError(f"{method} {url}: connection refused (is the server running on that "
                       "port?)") from None
    except socket.gaierror as exc:
        raise CLIError(f"{method} {url}: cannot resolve host {parts.hostname!r} "
                       f"({exc.strerror})") from None
    except (OSError, http.client.HTTPException) as exc:
        raise CLIError(f"{method} {url}: {exc.__class__.__name__}: {exc}") from None
    finally:
        conn.close()
    text = raw.decode("utf-8", "replace")
    try:
        doc = json_loads(text)
    except ValueError:
        doc = None
    return resp.status, doc, text


# well-known local ports of OpenAI-compatible servers
DISCOVERY_PORTS = {1234: "lmstudio", 11434: "ollama", 8080: "llamacpp", 8000: "vllm",
                   1337: "jan", 5000: "textgen", 5001: "koboldcpp"}


def discover_servers(ports, timeout=DISCOVER_TIMEOUT):
    """-> [(name, base URL, model ids)] for every port on 127.0.0.1 answering /v1/models."""
    found = []
    for port, name in ports.items():
        url = f"http://127.0.0.1:{port}/v1"
        try:
            status, doc, _ = http_json(url + "/models", timeout=timeout)
        except CLIError:
            continue
        ids = list_models(doc) if status == 200 else None
        if ids is not None:
            found.append((name, url, ids))
    return found


async def discover_models(client, upstreams):
    """GET /models of each of `upstreams`; -> {name: [ids]} for those that answered."""
    import asyncio

    async def one(up):
        try:
            status, doc = await fetch_models(client, up)
        except UpstreamError as exc:
            return up.name, None, exc.message
        if status != 200:
            return up.name, None, f"HTTP {status}"
        ids = list_models(doc)
        return up.name, ids, None if ids is not None else "not an OpenAI model list"

    found = {}
    results = await asyncio.gather(*(one(up) for up in upstreams))
    for name, ids, error in results:
        if ids is not None:
            found[name] = ids
        else:
            logger().warning("server %s: could not list its models (%s); keeping the list it "
                             "has (at start, the registry's)", name, error)
    return found


def registry_stamp(path):
    """What changes when the registry file is edited or replaced; None if there is none."""
    try:
        st = os.stat(path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        return None


def serving_registry(path, environ, workers):
    """The registry as `serve` uses it -> (doc, upstream keys by server name); RegistryError
    if broken, or if it holds managed entries and `serve` runs several workers."""
    doc = load_registry(path)
    if workers:
        refuse_managed_under_workers(doc["servers"])
    return doc, {e["name"]: entry_api_key(e, environ) for e in doc["servers"]}


class Gateway:
    """Everything `serve` runs, built from the registry and the options; also what tests start."""

    def __init__(self, registry, *, environ=None, api_keys=(), max_concurrency=MAX_CONCURRENCY,
                 queue_size=QUEUE_SIZE, queue_timeout=QUEUE_TIMEOUT, access_log=None,
                 allowed_hosts=None, cors_origins=(), mcp_max_rounds=MCP_MAX_ROUNDS,
                 mcp_allow_urls=(), mcp_roots=(), max_running=None, parent=None,
                 last_good=None, discover_ports=None, store_responses=True,
                 metrics_public=False, key_labels=None, metrics_dir=None,
                 mcp_expose=None, mcp_secret=None, mcp_workers=False, clock=time.monotonic):
        self.registry = registry
        self.parent = parent  # pid of the `serve --workers N` that started this worker
        self.last_good = last_good  # (a worker of serve --workers) serve's last good (doc, keys)
        self.environ = dict(os.environ if environ is None else environ)
        self.sweeper = Sweeper()
        self.router = Router(clock)
        self.client = UpstreamClient(self.sweeper)
        self.admission = Admission(max_concurrency, queue_size, queue_timeout)
        self.processes = ProcessManager(registry, self.environ, self.client, max_running)
        self.app = Application(self.router, self.client, self.admission, api_keys=api_keys,
                               access_log=access_log, allowed_hosts=allowed_hosts,
                               cors_origins=cors_origins, mcp_environ=self.environ,
                               mcp_roots=mcp_roots, mcp_max_rounds=mcp_max_rounds,
                               mcp_allow_urls=mcp_allow_urls, processes=self.processes,
                               metrics_public=metrics_public, key_labels=key_labels,
                               mcp_tokens=tokens_path(registry), mcp_expose=mcp_expose,
                               mcp_secret=mcp_secret, mcp_workers=mcp_workers)
        # Stored responses (/v1/responses) live beside the registry, as its other state does.
        self.responses = ResponsesAPI(self.app, ResponseStore(
            os.path.abspath(registry) + ".responses.sqlite") if store_responses else None)
        self.responses.mount()
        self.http = HTTPServer(self.app, self.sweeper)
        self.registry_stamp = None
        self.next_watch = 0.0
        self.probing = set()  # names of cooling servers with a probe under way
        # While the registry names no server, serve looks for local ones on these ports
        # ({port: name}, as discover_servers takes them; None: never) and serves what it finds.
        self.discover_ports = discover_ports
        self.discovered = []  # entries found so, served while the registry stays empty
        self.discovery = None  # the probe under way (asyncio.Task), if any
        self.registry_empty = False  # whether the registry last loaded names no server
        self.listening = False
        self.tasks = set()
        if access_log is not None:
            self.sweeper.callbacks.append(access_log.flush)
        self.sweeper.callbacks.append(self.housekeeping)
        if metrics_dir is not None:  # (--workers: a scrape answers for all of them)
            self.app.metrics.shared = metrics_dir
            self.sweeper.callbacks.append(self.app.metrics.publish)

    def spawn(self, coro):
        import asyncio
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def start(self, host="127.0.0.1", port=0, sock=None):
        import asyncio
        self.http.idle = asyncio.Event()
        self.http.idle.set()
        reaped = self.processes.reap_orphans()
        if reaped:
            logger().warning("stopped %d managed server(s) left by a previous serve: pids %s",
                             len(reaped), ", ".join(map(str, reaped)))
        await self.reload(quiet=True)
        self.spawn(self.sweeper.run())
        addresses = await self.http.listen(host, port, sock=sock)
        # Probing never delays listening: it starts once clients can connect.
        self.listening = True
        self.discover_if_empty()
        return addresses

    async def reload(self, quiet=False):
        """Re-read the registry; a broken file keeps the last good one (and says why)."""
        self.registry_stamp = registry_stamp(self.registry)
        try:
            if (not quiet or self.last_good) and not os.path.exists(self.registry):
                raise RegistryError(f"{self.registry} is gone (restore it; to remove every "
                                    "server, `remove` them or write {\"version\": 1})")
            doc, keys = serving_registry(self.registry, self.environ, self.parent is not None)
        except RegistryError as exc:
            if not quiet:
                logger().error("registry not reloaded, keeping the last good one: %s", exc)
                return
            if self.last_good is None:
                raise
            # a worker of serve --workers: its peers keep their last good registry, so does it
            logger().error("registry not loaded, starting with the last good one: %s", exc)
            doc, keys = self.last_good
        self.last_good = None
        before = set(self.router.upstreams)
        self.registry_empty = not doc["servers"]
        if doc["servers"] and self.discovered:
            # The registry wins: once it names servers, the discovered ones go.
            logger().info("the registry names servers now: it replaces those discovered (%s)",
                          ", ".join(e["name"] for e in self.discovered))
            self.discovered = []
        self.router.load(doc["servers"] or self.discovered, keys)
        for entry in doc["servers"]:  # (the upstream's 401 would tell the client its own
            if entry.get("api_key_env") and not keys.get(entry["name"]):  # key is missing)
                logger().warning("server %s: environment variable %s is not set: its requests "
                                 "go without an API key", entry["name"], entry["api_key_env"])
        for server in self.processes.sync(self.router.upstreams):
            self.spawn(self.retire(server))
        roots = [up for up in self.router.upstreams.values() if not up.managed and
                 not up.origin.base_path]
        if roots:  # (in the background: a start does not wait for them)
            self.spawn(self.warn_root_urls(roots))
        await self.app.mcp.update(doc["mcpServers"])
        attached = {name for up in self.router.upstreams.values()
                    for name in up.entry.get("mcp", ())}
        if attached:  # connected now, not when the first request needs them
            self.spawn(self.app.mcp.warm(sorted(attached)))
        self.discover_if_empty()
        if not quiet:
            logger().info("registry reloaded: %d servers, %d models (added: %s; removed: %s)",
                          len(self.router.upstreams), len(self.router.table),
                          ", ".join(sorted(set(self.router.upstreams) - before)) or "-",
                          ", ".join(sorted(before - set(self.router.upstreams))) or "-")
        fresh = [up for up in self.router.upstreams.values() if not up.managed and
                 up.entry.get("discover")]  # all of them: a model pulled into Ollama meanwhile
        if fresh:
            found = await discover_models(self.client, fresh)
            for up in fresh:  # the router may have been reloaded meanwhile: update in place
                if up.name in found and self.router.upstreams.get(up.name) is up and \
                        not up.alias:  # an alias names its one model, whatever the list says
                    up.models = found[up.name]
            self.router.rebuild()

    async def warn_root_urls(self, ups):
        """Entries whose URL is a server's root (saved by hand, or by an `add` older than its
        /v1 check): a warning for each that answers GET /v1/models as an OpenAI API, since
        their requests go to the root, where llama.cpp answers with shapes of its own."""
        import asyncio

        async def one(up):
            try:
                status, doc = await fetch_json(self.client, up, "/v1/models")
            except UpstreamError:
                return
            if status == 200 and list_models(doc) is not None:
                logger().warning(
                    "server %s: its URL %s has no /v1 path, but %s/v1/models answers as an "
                    "OpenAI API: requests go to the root, where some servers answer otherwise "
                    "(llama.cpp's /embeddings); set its url to %s/v1 (or remove it and add it "
                    "again)", up.name, up.origin.base_url, up.origin.base_url,
                    up.origin.base_url)

        await asyncio.gather(*(one(up) for up in ups))

    def discover_if_empty(self):
        """The registry names no server (and nothing found is served yet): look for local
        ones in the background, as `discover` does, once listening."""
        if self.discover_ports and self.listening and self.registry_empty and \
                not self.discovered and self.discovery is None:
            self.discovery = self.spawn(self.discover())

    async def discover(self):
        """Probe the discovery ports; serve what answers, without writing the registry (the
        user's file holds what the user chose), unless the registry named servers meanwhile."""
        import asyncio
        try:
            found = await asyncio.get_running_loop().run_in_executor(
                None, discover_servers, self.discover_ports)
        finally:
            self.discovery = None
        if not self.registry_empty:
            return
        ports = ", ".join(map(str, self.discover_ports))
        if not found:
            logger().warning("no servers registered in %s, and none answered on local ports "
                             "%s: add one with `python3 llmhost.py add NAME URL` (serve picks "
                             "it up live)", self.registry, ports)
            return
        for name, url, ids in found:
            logger().info("discovered %s at %s serving %s", name, url,
                          ", ".join(ids[:10]) + (" …" if len(ids) > 10 else "") or "no models")
        self.discovered = [{"name": name, "url": url, "models": ids, "discover": True}
                           for name, url, ids in found]
        self.router.load(self.discovered, {})
        logger().info("registry %s is empty, so serving the %d server(s) found on this machine "
                      "(ports %s), without saving them: make them permanent with `python3 "
                      "llmhost.py discover --add` (servers the registry names replace them; "
                      "--no-discover turns this off)", self.registry, len(found), ports)

    async def retire(self, server):
        """A managed entry was removed or changed: stop its process once its requests end."""
        import asyncio
        if server.starting is not None:
            await asyncio.gather(server.starting, return_exceptions=True)
        while server.up.in_flight:
            await asyncio.sleep(0.1)
        await self.processes.stop(server, "removed from the registry")
        self.processes.retired.discard(server)

    def housekeeping(self, now):
        """Each sweep: notice registry edits (about once a second) and probe cooling servers."""
        if now >= self.next_watch:
            self.next_watch = now + WATCH_INTERVAL
            if registry_stamp(self.registry) != self.registry_stamp:
                self.spawn(self.reload())
            if self.parent is not None and os.getppid() != self.parent:
                import signal  # our serve was killed: no worker serves on unsupervised
                logger().error("the serve process that started this worker is gone; stopping")
                self.parent = None
                os.kill(os.getpid(), signal.SIGTERM)
        self.processes.idle_check(now, self.spawn)
        for up in self.router.cooling():
            if up.managed:
                continue  # its process manager decides when it is tried again
            if up.name not in self.probing:
                self.probing.add(up.name)
                self.spawn(self.probe(up))

    async def probe(self, up):
        """GET /models on a cooling server every PROBE_INTERVAL; an answer ends its cooldown."""
        import asyncio
        try:
            while up.cooldown_until > self.router.clock():
                await asyncio.sleep(PROBE_INTERVAL)
                try:
                    status, _ = await fetch_models(self.client, up)
                except UpstreamError:
                    continue
                if status == 200:
                    logger().info("server %s answers again; back in rotation", up.name)
                    self.router.recovered(up)
        finally:
            self.probing.discard(up.name)

    async def stop(self, timeout=SHUTDOWN_TIMEOUT):
        self.app.mcp_front.close()  # (its streams would hold the shutdown for its timeout)
        await self.http.shutdown(timeout)
        for task in list(self.tasks):
            task.cancel()
        await self.app.mcp.aclose()  # stdio children exit; none is left behind
        await self.processes.stop_all()
        self.client.close_all()
        self.responses.close()
        if self.app.access_log is not None:
            self.app.access_log.flush()
        self.app.metrics.publish(force=True)  # (its last counts stay in the workers' totals)


def serve_addresses(addresses, keys):
    shown = ", ".join(f"http://{'[' + h + ']' if ':' in h else h}:{p}" for h, p in addresses)
    return f"{shown} (auth {'on: ' + str(len(keys)) + ' key(s)' if keys else 'off'})"


# Where the commands that talk to a running serve (status, ps, load, unload) look when it
# has no record: serve's default --port.
DEFAULT_SERVE_URL = "http://127.0.0.1:4000"


def serve_record_path(registry):
    """The file beside the registry where its serve says where it listens (as the .pids file
    beside it says which managed servers it started)."""
    return os.path.abspath(registry) + ".serve"


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Another user's process: alive (as kill(1) would say "Operation not permitted").
        return True
    return True


def read_serve_record(registry):
    """-> (the record of the serve of `registry`, None) if that serve is alive, else (None,
    why not). A record whose pid has exited (serve was killed) is stale: ignored."""
    path = serve_record_path(registry)
    try:
        with open(path, encoding="utf-8") as f:
            record = json_loads(f.read())
    except FileNotFoundError:
        return None, f"no record at {path}"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"cannot read its record {path}: {exc}"
    pid = record.get("pid") if isinstance(record, dict) else None
    if not isinstance(pid, int) or pid <= 0 or not isinstance(record.get("url"), str) or \
            valid_url(record["url"]):
        return None, f"{path} is not a serve record"
    if not pid_alive(pid):
        return None, f"its record {path} names pid {pid}, which has exited"
    return record, None


def write_serve_record(registry, address, host):
    """Say where the serve of `registry` listens: pid, URL, started-at (never a key: the file
    is for finding serve, not for reaching it). Atomic, as the registry is saved. A failure
    is logged: serving goes on, and the commands then need --url."""
    import tempfile
    path = serve_record_path(registry)
    bound, port = address[:2]
    # A wildcard address is reached through loopback.
    connect = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bound, bound)
    url = f"http://[{connect}]:{port}" if ":" in connect else f"http://{connect}:{port}"
    other, _ = read_serve_record(registry)
    if other is not None and other["pid"] != os.getpid():
        logger().warning("another serve of %s (pid %d, %s) is running; status, ps, load and "
                         "unload now reach this one", registry, other["pid"], other["url"])
    record = {"pid": os.getpid(), "url": url, "host": host, "port": port,
              "registry": os.path.abspath(registry), "version": __version__,
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                                   dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            # Nothing in it is secret: whoever may read the registry may find its serve.
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        logger().warning("cannot write %s (%s): status, ps, load and unload need --url %s",
                         path, exc.strerror or exc, url)


def remove_serve_record(registry):
    """At serve's exit: remove the record if it is this process's (a serve of the same
    registry started since has its own)."""
    path = serve_record_path(registry)
    record, _ = read_serve_record(registry)
    if record is not None and record["pid"] == os.getpid():
        try:
            os.unlink(path)
        except OSError as exc:
            logger().warning("cannot remove %s: %s", path, exc.strerror or exc)


def one_line_sdk_errors(record):
    """Logging filter: the MCP SDK logs a transport's end (an SSE server going away) as an ERROR
    with a 40-line traceback; one line says as much."""
    if record.exc_info and record.name.startswith("mcp."):
        record.msg = "%s: %s" % (record.getMessage(), _describe_exc(record.exc_info[1]))
        record.args = ()
        record.exc_info = record.exc_text = None
    return True


def no_url_passwords(record):
    """Logging filter: a URL's password never reaches the log, whoever logs it (the SDKs too)."""
    message = record.getMessage()
    if "@" in message:
        record.msg, record.args = hide_password(message), ()
    return True


def worker_signals():
    """The signals a worker handles (serve: all but SIGUSR1, its "stop now" to the workers).
    Blocked from before a fork until each process has its handlers: one that came between
    them would kill serve with a traceback, or run serve's handler in a worker."""
    import signal
    return signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1


def run_worker(args, path, keys, options, max_concurrency, queue_size, sock=None, label=""):
    import asyncio
    gateway = Gateway(path, max_concurrency=max_concurrency, queue_size=queue_size,
                      access_log=AccessLog(sys.stderr, enabled=not args.no_access_log,
                                           json_lines=args.access_log_format == "json"),
                      **options)
    if sock is not None:  # a 429 says whose limit it met: the kernel spreads connections over
        gateway.admission.whose = (  # workers unevenly, so one may refuse while another has room
            f"this worker's share of --max-concurrency {args.max_concurrency} and --queue-size "
            f"{args.queue_size}")

    async def run():
        import signal
        loop = asyncio.get_running_loop()
        stop, now = asyncio.Event(), asyncio.Event()  # stop; and stop now (in-flight too)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: gateway.spawn(gateway.reload()))
        if sock is not None:  # a worker: serve passes on a second stop signal as SIGUSR1
            loop.add_signal_handler(signal.SIGUSR1, lambda: (stop.set(), now.set()))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, worker_signals())  # (run_workers blocks them)
        addresses = await gateway.start(args.host, args.port, sock=sock)
        import gc
        gc.freeze()  # what start-up built lives for good: later collections need not scan it
        # Python's own GC thresholds are kept (700, 10, 10 on 3.10-3.13): a request leaves no
        # cycles (see handle()), so a pass only scans the objects of the requests in flight,
        # and a young one every 700 of them stays under 1-4 ms; 10,000 made them 4-9 ms, each a
        # stall of every stream (at 50 paced streams: 0.3% of the CPU in passes, against 0.1%)
        logger().info("llmhost %s%s serving on %s; %d servers, %d models; registry %s",
                      __version__, label, serve_addresses(addresses, keys),
                      len(gateway.router.upstreams), len(gateway.router.table), path)
        if sock is None:
            write_serve_record(path, addresses[0], args.host)
        if not gateway.router.upstreams and not gateway.discover_ports:
            logger().warning("no servers registered in %s, and --no-discover: add one with "
                             "`python3 llmhost.py add NAME URL` (serve picks it up live)", path)
        await stop.wait()
        stopped = time.monotonic()
        logger().info("shutting down%s: finishing in-flight requests (up to %gs; Ctrl-C again "
                      "to stop them now)", label, args.shutdown_timeout)

        def hurry():
            if sock is None or time.monotonic() - stopped >= WORKER_SIGNAL_ECHO:
                now.set()  # (a worker gets the signal from serve, and the same one again when
                # it is sent to every process, as systemd and pkill do: one, not two)
            else:
                logger().debug("stop signal again%s: the same stop as the first", label)

        async def abandon_when_told():
            await now.wait()
            logger().warning("second signal%s: closing in-flight requests now", label)
            gateway.http.abandon_in_flight()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, hurry)
        told = loop.create_task(abandon_when_told())
        await gateway.stop(args.shutdown_timeout)
        told.cancel()

    try:
        asyncio.run(run())
    except OSError as exc:
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") \
            from None
    return 0


def run_workers(args, path, keys, options, workers, last_good):
    """N processes, each a full gateway, sharing one port through SO_REUSEPORT (the kernel
    spreads connections). Limits are split so the global --max-concurrency still holds.
    `last_good` is the registry serve read, as serving_registry gives it."""
    import signal
    import socket
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    try:  # a socket without SO_REUSEPORT binds only if nothing else holds the port: so
        with socket.socket(family, socket.SOCK_STREAM) as probe:  # another serve's workers
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # are not joined
            probe.bind((args.host, args.port))
    except OSError as exc:
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") \
            from None
    socks = []
    try:
        for _ in range(workers):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((args.host, args.port if not socks else socks[0].getsockname()[1]))
            sock.listen(1024)
            sock.setblocking(False)
            socks.append(sock)
    except (OSError, AttributeError) as exc:
        raise CLIError(f"cannot listen on {args.host}:{args.port} with {workers} workers: "
                       f"{getattr(exc, 'strerror', None) or exc}") from None
    write_serve_record(path, socks[0].getsockname(), args.host)
    children = {}  # pid -> index of its socket
    started = [0.0] * workers  # when each slot's worker was forked
    deaths = [[] for _ in socks]  # when each slot's workers died unasked
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # serve's (see worker_signals)

    def spawn(i, fallback):
        share = args.max_concurrency // workers + (i < args.max_concurrency % workers)
        queue = args.queue_size // workers + (i < args.queue_size % workers)
        signal.pthread_sigmask(signal.SIG_BLOCK, worker_signals())
        try:
            pid = os.fork()
        except OSError as exc:  # out of processes or memory: the caller stops serve
            return f"cannot start worker {i + 1}/{workers}: {exc.strerror or exc}"
        if pid == 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGCHLD,))  # (serve's alone)
            os.setpgid(0, 0)  # Ctrl-C reaches serve alone, which passes it on once: a worker
            worker_options = dict(options, parent=os.getppid(),  # takes a second one as "now"
                                  last_good=fallback)
            for other in socks:
                if other is not socks[i]:
                    other.close()
            code = 1
            try:
                code = run_worker(args, path, keys, worker_options, share, queue, sock=socks[i],
                                  label=f" worker {i + 1}/{workers}")
            except (CLIError, RegistryError) as exc:
                print(f"llmhost: error: {exc}", file=sys.stderr)
            except BaseException:  # a worker must never die without saying why
                import traceback
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        children[pid] = i
        started[i] = time.monotonic()
        return None

    stopping = False

    def forward(signum, _frame):
        nonlocal stopping
        if signum != signal.SIGHUP and stopping:  # a second stop signal: "now". Sent as its
            signum = signal.SIGUSR1  # own signal, for a worker takes a repeat of the first as
        elif signum != signal.SIGHUP:  # its echo (systemd and pkill signal every process)
            stopping = True
            for sock in socks:  # serve holds the sockets to respawn workers on them; held
                sock.close()  # while workers stop, they would queue connections nobody takes
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    # A worker that finds the file broken (or gone) as it starts takes the last good registry
    # serve read, as its peers keep theirs; none without a file (a first run has none).
    fallback = last_good if registry_stamp(path) is not None else None
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGCHLD,))  # for sigtimedwait below
    for i in range(workers):
        failed = spawn(i, fallback)
        if failed:  # the ones started stop as at Ctrl-C (their signals are theirs by now)
            forward(signal.SIGTERM, None)
            for pid in children:
                os.waitpid(pid, 0)
            raise CLIError(failed)
    for sig in signals:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
    seen = None  # (so the first look reads the file: an edit made as the workers started counts)

    def follow_registry():
        """Serve follows registry edits as its workers do, so that one replacing a dead worker
        while the file is broken can start with what its peers have (the last good one; also
        when the file is deleted, which the workers refuse)."""
        nonlocal seen, fallback
        stamp = registry_stamp(path)
        if stamp is not None and stamp != seen:
            seen = stamp
            try:
                fallback = serving_registry(path, options["environ"], True)
                logger().debug("registry %s read: a worker started from now on gets it", path)
            except RegistryError:
                pass

    status = 0
    while children:
        pid, code = os.waitpid(-1, os.WNOHANG)
        if not pid:  # none has exited: wait for one, looking at the registry each second
            if hasattr(signal, "sigtimedwait"):
                signal.sigtimedwait((signal.SIGCHLD,), WATCH_INTERVAL)
            else:  # (not on macOS)
                time.sleep(0.1)
            follow_registry()
            continue
        i = children.pop(pid, None)
        if i is None:
            continue
        code = os.waitstatus_to_exitcode(code)
        how = f"code {code}"
        if code < 0:  # killed by a signal: reported as a shell would, 128 + its number
            how = next((s.name for s in signal.Signals if s == -code), f"signal {-code}")
            code = 128 - code
        if stopping:
            status = status or code
            continue
        # A worker gone unasked (killed, crashed, out of memory): its socket is still open
        # here, so connections the kernel gives it wait in its backlog for a new worker, as
        # nginx's master replaces a worker. One that failed at start, or keeps dying, stops
        # serve instead: respawning it would hide the fault in a loop.
        now = time.monotonic()
        deaths[i] = [t for t in deaths[i] if now - t < WORKER_DEATHS[1]] + [now]
        at_start = now - started[i] < WORKER_MIN_UPTIME
        if at_start or len(deaths[i]) >= WORKER_DEATHS[0]:
            logger().error("worker %d/%d (pid %d) exited (%s) %s; stopping the others", i + 1,
                           workers, pid, how, "at start" if at_start else
                           f"for the {len(deaths[i])}th time in {WORKER_DEATHS[1]:g}s")
            forward(signal.SIGTERM, None)
            status = code or 1
            continue
        logger().error("worker %d/%d (pid %d) exited (%s) on its own; starting a new one",
                       i + 1, workers, pid, how)
        follow_registry()
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        failed = None if stopping else spawn(i, fallback)  # (a signal just now closed the
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)  # sockets: none to respawn)
        if failed:  # as nginx, which does not retry a failed fork either; a supervisor can
            logger().error("%s; stopping the others", failed)  # (systemd's Restart=)
            forward(signal.SIGTERM, None)
            status = 1
    return status


# =============================================================================
# Bench
# =============================================================================
# Owns: `bench`, a load generator that measures one OpenAI-compatible endpoint (llmhost or
# any upstream) with llmhost's own upstream client: throughput, latency, first-token time.
# Never: starts a server; reports only what finished.


def percentile(values, p):
    """Nearest-rank percentile of a non-empty list (what wrk and most load tools report)."""
    import math
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


def error_message(raw, limit=300):
    """The message of an error body or event (as upstream_error_message finds it), cut to one
    short line."""
    raw = raw if isinstance(raw, bytes) else raw.encode()
    if not raw.strip():
        return "(empty body)"
    text = " ".join(upstream_error_message(0, raw)[0].split())
    return text[:limit] + ("…" if len(text) > limit else "")


async def bench_run(args, api_key, progress=sys.stderr):
    """Load one OpenAI-compatible endpoint; -> a dict of results (see cmd_bench).

    Each request's prompt starts with its number, so no server answers it from a prompt cache.
    The run ends after --requests answers, at --duration (requests still open then are cut and
    counted as unfinished, not as errors) or at Ctrl-C, and reports what finished."""
    import asyncio
    import signal
    from collections import Counter
    loop = asyncio.get_running_loop()
    sweeper = Sweeper()
    client = UpstreamClient(sweeper)
    ticker = loop.create_task(sweeper.run())
    up = Upstream({"name": "bench", "url": args.url.rstrip("/")}, api_key)
    origin = up.origin
    prompt = args.prompt or " ".join(["hello"] * args.prompt_tokens)
    latency, ttft, itl, tokens = [], [], [], []
    errors, messages = Counter(), {}
    unfinished = 0
    started = time.monotonic()
    end = started + args.duration if args.duration else None
    issued = 0

    def fail(kind, message):
        errors[kind] += 1
        messages.setdefault(kind, message)
        return kind

    async def one(n):
        """One request; -> the kind of error, or None."""
        nonlocal unfinished
        body = {"model": args.model, "max_tokens": args.max_tokens,
                "messages": [{"role": "user", "content": f"{n}: {prompt}"}]}
        if args.stream:
            body.update(stream=True, stream_options={"include_usage": True})
        payload = json_bytes(body)
        head = up.head("POST", origin.base_path + "/chat/completions", len(payload))
        t0 = time.monotonic()
        resp = None
        try:
            resp = await client.request(origin, head, payload, timeout=args.timeout)
            if resp.status != 200:
                return fail(f"HTTP {resp.status}", error_message(await resp.read_all()))
            count = 0
            if not args.stream:
                raw = await resp.read_all()
                doc = json_loads(raw)
                if not isinstance(doc, dict) or not isinstance(doc.get("choices"), list):
                    return fail("bad answer", "not a chat completion: " + error_message(raw))
                count = (doc.get("usage") or {}).get("completion_tokens") or 0
                latency.append(time.monotonic() - t0)
                tokens.append(count)
                return None
            kind = resp.headers.get("content-type", "")
            if "text/event-stream" not in kind.lower():
                return fail("bad answer", f"asked for a stream, got {kind or 'no Content-Type'}: "
                            + error_message(await resp.read_all()))
            decoder = SSEDecoder()
            first = last = None
            gaps = []
            finished = False
            while True:
                data = await resp.read_some()
                if not data:
                    break
                for event in decoder.feed(data):
                    if event == "[DONE]":
                        finished = True
                    if finished:
                        continue
                    doc = json_loads(event)
                    if doc.get("error"):
                        return fail("error event", error_message(event))
                    if doc.get("usage"):
                        count = doc["usage"].get("completion_tokens") or count
                    delta = ((doc.get("choices") or [{}])[0] or {}).get("delta") or {}
                    if delta.get("content") or delta.get("reasoning_content") or \
                            delta.get("tool_calls"):
                        now = time.monotonic()
                        if first is None:
                            first = now
                        else:
                            gaps.append(now - last)
                        last = now
                        count += 0 if doc.get("usage") else 1
            if not finished:
                return fail("broken", "the stream ended without data: [DONE]")
            done = time.monotonic()
            latency.append(done - t0)
            ttft.append((first or done) - t0)
            itl.extend(gaps)
            tokens.append(count)
            return None
        except UpstreamTimeout as exc:
            return fail("connect" if exc.code == "upstream_connect_timeout" else "timeout",
                        exc.message)
        except UpstreamError as exc:
            return fail("connect" if exc.code == "upstream_unreachable" else "broken",
                        exc.message)
        except (ValueError, AttributeError, TypeError, IndexError) as exc:
            return fail("bad answer", f"{type(exc).__name__}: {exc}")
        except asyncio.CancelledError:
            unfinished += 1  # cut at the deadline or by Ctrl-C
            raise
        finally:
            if resp is not None and not resp.done:
                resp.close()  # an answer not read to its end: its connection is not reused

    async def worker(delay):
        nonlocal issued
        await asyncio.sleep(delay)  # --ramp: clients join one by one, as real ones do
        while (issued < args.requests) if end is None else (time.monotonic() < end):
            issued += 1
            if await one(issued) == "connect":
                await asyncio.sleep(0.1)  # a server that is down: do not spin on it

    async def show_progress():
        while True:
            await asyncio.sleep(0.5)
            elapsed = time.monotonic() - started
            progress.write(f"\r  {len(latency)} ok, {sum(errors.values())} errors, "
                           f"{len(latency) / elapsed:.1f} req/s, {elapsed:.0f}s ")
            progress.flush()

    interrupted = False
    workers = [loop.create_task(worker(i * args.ramp / args.concurrency))
               for i in range(args.concurrency)]

    def interrupt():
        nonlocal interrupted
        interrupted = True
        for task in workers:
            task.cancel()

    try:
        loop.add_signal_handler(signal.SIGINT, interrupt)
    except (NotImplementedError, RuntimeError, ValueError):
        pass  # not the main thread (tests) or no signals here: Ctrl-C ends without a summary
    shower = loop.create_task(show_progress()) if progress.isatty() else None
    try:
        await asyncio.wait(workers, timeout=None if end is None else end - time.monotonic())
        for task in workers:
            task.cancel()  # still in a request at the deadline
        for outcome in await asyncio.gather(*workers, return_exceptions=True):
            if isinstance(outcome, Exception):
                raise outcome
    finally:
        try:
            loop.remove_signal_handler(signal.SIGINT)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
        if shower:
            shower.cancel()
            progress.write("\n")
        ticker.cancel()
        client.close_all()
    elapsed = time.monotonic() - started

    def stats(values):
        if not values:
            return None
        return {"mean": sum(values) / len(values) * 1000, **{
            f"p{p}": percentile(values, p) * 1000 for p in (50, 90, 99)}}

    return {"url": args.url, "model": args.model, "stream": args.stream,
            "concurrency": min(args.concurrency, args.requests or args.concurrency),
            "seconds": round(elapsed, 3), "requests": len(latency),
            "errors": dict(errors), "error_messages": messages, "unfinished": unfinished,
            "interrupted": interrupted, "requests_per_second": len(latency) / elapsed,
            "output_tokens_per_second": sum(tokens) / elapsed,
            "latency_ms": stats(latency), "ttft_ms": stats(ttft), "itl_ms": stats(itl)}


# =============================================================================
# Chat console
# =============================================================================
# Owns: `chat`, a conversation from the console through the Responses API, as any client
# sees it: of a running serve, or of a Gateway this process starts over the registry on a
# Unix socket in a private folder (no port is opened). Its slash commands, pipe mode and the
# conversation's JSON file.
# Raises: CLIError for what stops it (no model, a pipe's failed answer); in the interactive
# loop an error is one line and the session goes on.
# Never: reads the environment (cmd_chat passes the key and the registry down).

CHAT_HELP = """commands:
  /model [NAME]   switch model (no NAME: list them)
  /system [TEXT]  set the system prompt (no TEXT: clear it)
  /image PATH     attach an image to the next message
  /tools          the MCP tools the model gets
  /clear          forget the conversation
  /save FILE      save the conversation (JSON messages; load it with --load FILE)
  /help           this text
  /exit           leave (or Ctrl-D)
A line ending in \\ goes on on the next line; \"\"\" starts and ends a multi-line message.
Ctrl-C stops an answer."""


def unix_http_connection(path, timeout):
    """An http.client connection to a server listening on the Unix socket `path`."""
    import http.client
    import socket

    class UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(self.timeout)
            self.sock.connect(path)

    return UnixConnection("localhost", timeout=timeout)


class LocalGateway:
    """A Gateway over the registry, on its own event loop in a thread, listening on a Unix
    socket in a private temporary folder: `chat` without a serve running."""

    def __init__(self, registry, environ):
        import asyncio
        import socket
        import tempfile
        import threading
        self.folder = tempfile.mkdtemp(prefix="llmhost-chat-")  # mode 0700: ours alone
        self.path = os.path.join(self.folder, "gateway.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        # Nothing is kept: the conversation is the console's (and --no-store's sqlite file
        # would otherwise be written beside the registry by a mere chat).
        self.gateway = Gateway(registry, environ=environ, store_responses=False)
        try:
            self.call(self.gateway.start(sock=sock), MCP_CONNECT_TIMEOUT)
        except BaseException:
            self.close()
            raise

    def call(self, coro, timeout):
        import asyncio
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        import shutil
        try:
            self.call(self.gateway.stop(CHAT_STOP_TIMEOUT), CHAT_STOP_TIMEOUT + MCP_CLOSE_TIMEOUT)
        except Exception:  # (closing at exit: what could not close goes with the process)
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(CHAT_STOP_TIMEOUT)
        shutil.rmtree(self.folder, ignore_errors=True)


class ChatClient:
    """llmhost's API, as `chat` uses it: over http(s) at `base` (no /v1), or a Unix socket."""

    def __init__(self, base=None, api_key=None, unix=None):
        self.base = base
        self.api_key = api_key
        self.unix = unix
        self.conn = None  # the connection of the answer being streamed (Ctrl-C closes it)

    def where(self):
        return self.base or "llmhost in this process"

    def connection(self, timeout):
        from urllib.parse import urlsplit
        if self.unix:
            return unix_http_connection(self.unix, timeout)
        return http_connection(urlsplit(self.base), timeout)

    def headers(self, extra=()):
        headers = {"User-Agent": f"llmhost-chat/{__version__}", **dict(extra)}
        if self.api_key:
            headers["Authorization"] = b"Bearer " + self.api_key.encode("utf-8",
                                                                        "surrogateescape")
        return headers

    def send(self, method, path, body=None, timeout=PROBE_TIMEOUT):
        """-> the http.client response, its connection open. CLIError if none came."""
        import http.client
        import socket
        conn = self.connection(timeout)
        data = None if body is None else json_bytes(body)
        try:
            conn.request(method, path, body=data, headers=self.headers(
                {"Content-Type": "application/json"} if data is not None else ()))
            return conn, conn.getresponse()
        except socket.timeout:
            conn.close()
            raise CLIError(f"{self.where()}: no answer within {timeout:g}s") from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise CLIError(f"{self.where()}: {exc.strerror or exc.__class__.__name__}"
                           if isinstance(exc, OSError) and exc.strerror else
                           f"{self.where()}: {exc.__class__.__name__}: {exc}") from None
        except BaseException:  # Ctrl-C before the answer's head: the request is dropped
            conn.close()
            raise

    @staticmethod
    def refusal(resp, raw):
        """The one line an error answer comes down to."""
        try:
            doc = json_loads(raw)
            message = doc["error"]["message"]
        except (ValueError, TypeError, KeyError):
            message = raw.decode("utf-8", "replace").strip()[:300] or resp.reason
        return f"HTTP {resp.status}: {message}"

    def get_json(self, path, timeout=PROBE_TIMEOUT):
        conn, resp = self.send("GET", path, timeout=timeout)
        try:
            raw = resp.read(MAX_UPSTREAM_BODY)
        finally:
            conn.close()
        if resp.status != 200:
            raise CLIError(self.refusal(resp, raw))
        try:
            return json_loads(raw)
        except ValueError:
            raise CLIError(f"GET {path}: not JSON") from None

    def models(self):
        ids = list_models(self.get_json("/v1/models"))
        if ids is None:
            raise CLIError(f"{self.where()}: GET /v1/models is no model list")
        return ids

    def stream(self, body):
        """POST /v1/responses with stream: true -> its events, as they come."""
        conn, resp = self.send("POST", "/v1/responses", body, UPSTREAM_TIMEOUT)
        self.conn = conn
        try:
            if resp.status != 200:
                raise CLIError(self.refusal(resp, resp.read(MAX_UPSTREAM_BODY)))
            data = []
            while True:
                line = resp.readline(MAX_BODY_BYTES)
                if not line:
                    return
                line = line.rstrip(b"\r\n")
                if line.startswith(b"data:"):
                    data.append(line[5:].lstrip(b" "))
                elif not line and data:
                    text, data = b"\n".join(data), []
                    if text == b"[DONE]":
                        return
                    try:
                        yield json_loads(text)
                    except ValueError:
                        raise CLIError("the answer's stream broke (an event that is no "
                                       "JSON)") from None
        finally:
            self.abort()

    def abort(self):
        """Close the streamed answer's connection: serve sees its client gone and stops the
        upstream's generation, as for any client that leaves."""
        import socket
        conn, self.conn = self.conn, None
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if conn is not None:
            conn.close()


def image_data_url(path):
    """A file as a data URL, its type from its name (as browsers do for file: URLs)."""
    import base64
    import mimetypes
    kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
    try:
        if os.path.getsize(path) > CHAT_IMAGE_BYTES:
            raise CLIError(f"{path}: larger than {CHAT_IMAGE_BYTES // (1024 * 1024)} MB")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise CLIError(f"{path}: {exc.strerror or exc}") from None
    return f"data:{kind};base64," + base64.b64encode(data).decode("ascii")


def chat_turn_input(messages):
    """Chat-format messages (what /save writes) -> the Responses API's input items."""
    items = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                if p.get("type") == "image_url":
                    url = p["image_url"]["url"] if isinstance(p.get("image_url"), dict) \
                        else p.get("image_url")
                    parts.append({"type": "input_image", "image_url": url})
                elif p.get("type") == "text":
                    parts.append({"type": "input_text" if m["role"] == "user" else
                                  "output_text", "text": p.get("text", "")})
            content = parts
        items.append({"role": m["role"], "content": content if content is not None else ""})
    return items


def load_conversation(path):
    """-> (system text or None, messages) from a file /save wrote (or any JSON array of chat
    messages, or an object with "messages")."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json_loads(f.read())
    except OSError as exc:
        raise CLIError(f"--load {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CLIError(f"--load {path}: not JSON ({exc})") from None
    messages = doc.get("messages") if isinstance(doc, dict) else doc
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
            for m in messages):
        raise CLIError(f"--load {path}: not a JSON array of messages with a role of system, "
                       "user or assistant")
    system = "\n".join(str(m.get("content") or "") for m in messages if m["role"] == "system")
    return system or None, [m for m in messages if m["role"] != "system"]


class ChatSession:
    """One console conversation: its model, system prompt, messages and pending images."""

    DIM, RESET = "\x1b[2m", "\x1b[0m"

    def __init__(self, client, model, out, *, system=None, messages=(), images=(),
                 no_mcp=False, as_json=False, tty=True):
        self.client = client
        self.model = model
        self.out = out
        self.system = system
        self.messages = list(messages)
        self.images = list(images)  # data URLs for the next message
        self.no_mcp = no_mcp
        self.as_json = as_json
        self.tty = tty

    def write(self, text, dim=False):
        if dim and self.tty:
            text = self.DIM + text + self.RESET
        self.out.write(text)
        self.out.flush()

    def user_message(self, text):
        if not self.images:
            return {"role": "user", "content": text}
        parts = [{"type": "text", "text": text}] + [
            {"type": "image_url", "image_url": {"url": url}} for url in self.images]
        return {"role": "user", "content": parts}

    def request(self):
        body = {"model": self.model, "input": chat_turn_input(self.messages), "stream": True,
                "store": False}
        if self.system:
            body["instructions"] = self.system
        if self.no_mcp:  # the model calls no tool: none of its MCP servers' is run
            body["tool_choice"] = "none"
        return body

    def ask(self, text):
        """Send `text` (and the pending images); show the answer as it streams -> the final
        response object. CLIError (the message is then not kept) on an error; Ctrl-C stops
        the answer and keeps what came."""
        self.messages.append(self.user_message(text))
        self.images = []
        start = time.monotonic()
        first = None
        pieces, shown, final = [], None, None  # shown: the kind of text last written
        deltas = 0
        try:
            for event in self.client.stream(self.request()):
                kind = event.get("type")
                if kind in ("response.output_text.delta", "response.reasoning_text.delta"):
                    reasoning = kind == "response.reasoning_text.delta"
                    first = first or time.monotonic()
                    deltas += 1
                    if not reasoning:
                        pieces.append(event.get("delta", ""))
                    if self.as_json or reasoning and not self.tty:
                        continue  # (a pipe gets the answer only)
                    if shown is not None and shown != reasoning:
                        self.write("\n")
                    shown = reasoning
                    self.write(event.get("delta", ""), dim=reasoning)
                elif kind == "response.output_item.done" and \
                        event.get("item", {}).get("type") == "mcp_call" and self.tty:
                    self.show_call(event["item"], shown is not None)
                    shown = None
                elif kind == "response.output_item.added" and \
                        event.get("item", {}).get("type") == "message" and pieces:
                    pieces.append("\n\n")  # a later round's text: a message of its own
                elif kind in ("response.completed", "response.incomplete"):
                    final = event.get("response")
                elif kind == "response.failed":
                    error = (event.get("response") or {}).get("error") or {}
                    raise CLIError(error.get("message") or "the answer failed")
                elif kind == "error":
                    raise CLIError(event.get("message") or "the answer failed")
        except KeyboardInterrupt:
            self.client.abort()
            self.write("\n")
            self.write("[stopped]", dim=True)
            self.write("\n")
            self.messages.append({"role": "assistant", "content": "".join(pieces)})
            return None
        except CLIError:
            self.messages.pop()
            if shown is not None:
                self.write("\n")
            raise
        if final is None:
            self.messages.pop()
            if shown is not None:
                self.write("\n")
            raise CLIError("the answer ended before it was complete (the server or the "
                           "model went away)")
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        if self.as_json:
            self.write(json.dumps(final, indent=2, ensure_ascii=False) + "\n")
            return final
        if shown is not None or not self.tty:
            self.write("\n")
        if self.tty:
            self.write(self.stats(start, first, final, deltas), dim=True)
            self.write("\n")
        return final

    def show_call(self, item, midline):
        args = item.get("arguments") or "{}"
        try:
            args = json.dumps(json_loads(args), ensure_ascii=False)
        except ValueError:
            pass
        result = item.get("output") if item.get("error") is None else \
            f"error: {item.get('error')}"
        result = " ".join(str(result or "").split())
        if len(result) > CHAT_RESULT_CHARS:
            result = result[:CHAT_RESULT_CHARS] + "…"
        self.write(("\n" if midline else "") +
                   f"↳ {item.get('server_label')}__{item.get('name')} {args}\n")
        self.write(f"  {result}\n", dim=True)

    @staticmethod
    def stats(start, first, final, deltas):
        """First-token time and tokens/s, from the stream: its usage's output tokens (else
        its deltas) over the time from the first token to the end."""
        end = time.monotonic()
        if first is None:
            return f"[{end - start:.2f}s, no text]"
        tokens = ((final or {}).get("usage") or {}).get("output_tokens") or deltas
        rate = f", {tokens / (end - first):.1f} tokens/s" if end > first else ""
        return f"[first token {first - start:.2f}s{rate}, {tokens} tokens]"

    # -- the interactive loop ------------------------------------------------------------------
    def command(self, line):
        """Run a slash command -> False to leave."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self.write(CHAT_HELP + "\n")
        elif name == "/model":
            if rest:
                self.model = rest
                self.write(f"model: {rest}\n")
            else:
                for i, m in enumerate(self.client.models(), 1):
                    self.write(f"{'*' if m == self.model else ' '}{i:3}  {m}\n")
        elif name == "/system":
            self.system = rest or None
            self.write("system prompt " + ("set" if rest else "cleared") + "\n")
        elif name == "/image":
            if not rest:
                raise CLIError("usage: /image PATH")
            self.images.append(image_data_url(os.path.expanduser(rest)))
            self.write(f"{rest} is attached to your next message\n")
        elif name == "/tools":
            from urllib.parse import quote
            # (listing tools may wait for an MCP server still starting: spawn and handshake)
            doc = self.client.get_json("/v1/mcp/tools?model=" + quote(self.model, safe=""),
                                       MCP_CONNECT_TIMEOUT)
            tools = doc.get("data") or []
            if not tools:
                self.write(f"no MCP tools are attached to {self.model}\n")
            for t in tools:
                fn = t.get("function") or {}
                about = " ".join(str(fn.get("description") or "").split())
                self.write(f"{fn.get('name')}  " + (about[:100] if about else "") + "\n")
        elif name == "/clear":
            self.messages = []
            self.images = []
            self.write("conversation cleared\n")
        elif name == "/save":
            if not rest:
                raise CLIError("usage: /save FILE")
            self.save(os.path.expanduser(rest))
            self.write(f"saved {len(self.messages)} messages to {rest}\n")
        else:
            raise CLIError(f"unknown command {name} (/help lists them)")
        return True

    def save(self, path):
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + \
            self.messages
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(messages, indent=1, ensure_ascii=False) + "\n")
        except OSError as exc:
            raise CLIError(f"{path}: {exc.strerror or exc}") from None

    def read_message(self, read):
        """One message from the console (`read(prompt)` is input): a line; lines ending in a
        backslash go on; \"\"\" opens and closes a block. EOFError on Ctrl-D."""
        line = read("> ")
        if line.strip().startswith('"""'):
            first = line.strip()[3:]
            if first.endswith('"""'):
                return first[:-3]
            lines = [first] if first else []
            while True:
                line = read("… ")
                if line.rstrip().endswith('"""'):
                    lines.append(line.rstrip()[:-3])
                    return "\n".join(lines).strip("\n")
                lines.append(line)
        lines = []
        while line.endswith("\\"):
            lines.append(line[:-1])
            line = read("… ")
        lines.append(line)
        return "\n".join(lines)

    def loop(self, read=input):
        self.write(f"chatting with {self.model} via {self.client.where()} (/help for commands, "
                   "Ctrl-D to leave)", dim=True)
        self.write("\n")
        while True:
            try:
                text = self.read_message(read)
            except EOFError:
                self.write("\n")
                return 0
            except KeyboardInterrupt:
                self.write("\n")
                continue
            if not text.strip():
                continue
            try:
                if text.startswith("/") and not text.startswith("//"):
                    if not self.command(text.strip()):
                        return 0
                else:
                    self.ask(text[1:] if text.startswith("//") else text)
            except CLIError as exc:
                self.write(f"error: {hide_password(str(exc))}\n")
            except KeyboardInterrupt:
                self.write("\n")


def chat_pick_model(client, tty, read=input, out=sys.stdout):
    """No MODEL given: the only one; on a console, the user's pick by number."""
    models = client.models()
    if len(models) == 1:
        return models[0]
    if not models:
        raise CLIError(f"{client.where()} serves no models (add one: llmhost.py add NAME URL)")
    if not tty:
        raise CLIError(f"{len(models)} models are served; name one: " + ", ".join(models))
    for i, m in enumerate(models, 1):
        out.write(f"{i:3}  {m}\n")
    while True:
        answer = read("model number: ").strip()
        if answer.isdigit() and 1 <= int(answer) <= len(models):
            return models[int(answer) - 1]
        if answer in models:
            return answer


# =============================================================================
# CLI
# =============================================================================
# Owns: argparse subcommands, the environment (LLMHOST_REGISTRY, LLMHOST_API_KEY, api_key_env
# variables), the synchronous probe `add` runs, and building the server in `serve`.
# Errors: one line on stderr, exit status 1 (2 for usage errors, as argparse does).


def registry_path(args, environ):
    return args.registry or environ.get("LLMHOST_REGISTRY") or "servers.json"


def probe_server(url, api_key, timeout=None):
    """-> (base URL that answered, model ids). Tries {url}/models, then {url}/v1/models; a URL
    without a path tries {url}/v1 first: a server's root is not its OpenAI base URL, though
    llama.cpp answers /models there too (and /embeddings, of another shape than OpenAI's)."""
    tried = []
    bases = [url]
    if not url.rstrip("/").endswith("/v1"):
        bases.append(url.rstrip("/") + "/v1")
        if is_root_url(url):
            bases.reverse()
    for base in bases:
        status, doc, text = http_json(base + "/models", api_key, timeout)
        tried.append(f"GET {base}/models -> {status}")
        if status in (401, 403):
            raise CLIError(f"GET {base}/models: the server refused the key (HTTP {status}). "
                           "Pass the upstream's key with --api-key-env VAR (or --api-key).")
        if status == 200:
            ids = list_models(doc)
            if ids is not None:
                return base, ids
            tried[-1] += " (not an OpenAI model list)"
    raise CLIError("no OpenAI-compatible model list found: " + "; ".join(tried) +
                   ". URL must be the base URL a client would use, e.g. http://127.0.0.1:8080/v1 "
                   "(use --no-check to add a server that is not up yet).")


def is_root_url(url):
    """Whether an http(s) URL has no path (or just "/"): a server's address, not an API's."""
    from urllib.parse import urlsplit
    return not urlsplit(url).path.strip("/")


def auth_source(entry):
    if entry.get("api_key_env"):
        return f"env:{entry['api_key_env']}"
    if entry.get("api_key"):
        return "key in file"
    return "-"


def public_entry(entry):
    """An entry as shown to people: never the key itself."""
    out = {k: v for k, v in entry.items() if k != "api_key"}
    if "url" in out:
        out["url"] = hide_password(out["url"])
    if "env" in out:  # values may be secrets: only the names are shown
        out["env"] = sorted(out["env"])
    out.setdefault("models", [])
    out["auth"] = auth_source(entry)
    return out


def print_table(rows, header):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def entry_api_key(entry, environ):
    """The entry's upstream key, stripped (a key read with $(cat file) ends with a newline)."""
    if entry.get("api_key_env"):
        key = (environ.get(entry["api_key_env"]) or "").strip()
        where = f"environment variable {entry['api_key_env']}"
    else:
        key = (entry.get("api_key") or "").strip()
        where = "api_key"
    if any(c in key for c in "\r\n\0"):
        raise RegistryError(f"server {entry['name']}: the {where} holds a line break or NUL")
    return key or None


# `add` options copied into an entry as given (both kinds of entry)
SERVER_OPTIONS = ("alias", "api_key_env", "api_key", "timeout", "max_concurrency", "priority",
                  "vision", "mcp", "stream_usage", "native")


def parse_native(text):
    """`--native responses,messages` -> the entry's "native" list (None if not given)."""
    if text is None:
        return None
    apis = list(dict.fromkeys(a.strip() for a in text.split(",") if a.strip()))
    unknown = [a for a in apis if a not in NATIVE_APIS]
    if unknown or not apis:
        raise CLIError(f"--native takes {' and/or '.join(NATIVE_APIS)}, comma-separated"
                       f"{f', not {unknown[0]!r}' if unknown else ''}")
    return apis


def copy_options(args, entry, fields):
    for field in fields:
        value = getattr(args, field, None)
        if value is not None:
            entry[field] = value


def append_server(path, entry):
    def change(doc):
        if find_server(doc, entry["name"]):
            raise RegistryError(f"a server named {entry['name']!r} was added meanwhile")
        doc["servers"].append(entry)

    update_registry(path, change)


def cmd_add(args, environ):
    path = registry_path(args, environ)
    if not NAME_RE.fullmatch(args.name):
        raise CLIError(f"invalid name {args.name!r}: use 1-64 of A-Z a-z 0-9 . _ -")
    if args.api_key and args.api_key_env:
        raise CLIError("use either --api-key-env or --api-key, not both")
    if args.api_key_env and not ENV_NAME_RE.fullmatch(args.api_key_env):
        raise CLIError(f"invalid environment variable name {args.api_key_env!r}")
    args.native = parse_native(args.native)
    for field in ("timeout", "max_concurrency", "ttl", "start_timeout", "ready_path"):
        value = getattr(args, field)
        check, what = SERVER_FIELDS[field]
        if value is not None and not check(value):  # said now, by its flag, before any probe
            raise CLIError(f"--{field.replace('_', '-')} must be {what.replace('null or ', '')}")
    if args.command:
        return add_managed(args, environ, path)
    if not args.url:
        raise CLIError("give the server's base URL (or --command for one llmhost starts)")
    given = [f"--{f.replace('_', '-')}" for f in ("check",) + MANAGED_FIELDS[1:]
             if getattr(args, f) not in (None, False)]
    if given:
        raise CLIError(f"{', '.join(given)}: only for --command entries (servers llmhost starts)")
    url = args.url.strip()
    reason = valid_url(url)
    if reason:
        raise CLIError(f"invalid URL {hide_password(repr(args.url))}: {reason} "
                       "(example: http://127.0.0.1:8080/v1)")
    url = url.rstrip("/")
    for suffix in ("/chat/completions", "/completions", "/models", "/embeddings"):
        if url.endswith(suffix):
            raise CLIError(f"{url} looks like an endpoint, not a base URL: use "
                           f"{url[:-len(suffix)]}")
    if args.alias and len(args.model or ()) > 1:
        raise CLIError("--alias needs exactly one --model")
    existing = load_registry(path)  # fail early (and on a broken file) before probing
    if find_server(existing, args.name):
        raise CLIError(f"a server named {args.name!r} already exists in {path}; "
                       f"remove it first or pick another name")
    api_key = args.api_key
    if args.api_key_env:
        api_key = environ.get(args.api_key_env)
        if not api_key and not args.no_check:
            raise CLIError(f"environment variable {args.api_key_env} is not set; export it "
                           "first (or add with --no-check)")
    models = list(dict.fromkeys(args.model or ()))
    if not args.no_check:
        base, listed = probe_server(url, api_key)
        if base != url:
            print(f"note: using {base}, where the server's OpenAI API answers (at its root, "
                  "llama.cpp serves an API of its own: /embeddings of another shape)" if
                  is_root_url(url) else f"note: {url}/models lists no models; using {base}",
                  file=sys.stderr)
            url = base
        missing = [m for m in models if m not in listed]
        if missing:
            hints = [f"{m} (did you mean {m}:latest?)" if f"{m}:latest" in listed else m
                     for m in missing]
            shown = ", ".join(listed[:20]) + (" …" if len(listed) > 20 else "")
            raise CLIError(f"{url} does not serve {', '.join(hints)}; it lists: "
                           f"{shown or '(no models)'}")
        if not models:
            models = listed
    if args.alias and len(models) != 1:  # (an upstream that serves one model names it)
        raise CLIError("--alias needs exactly one model: " + (
            f"{url} lists {len(models)}; pick one with --model" if models else "give it with --model"))
    entry = {"name": args.name, "url": url, "models": models}
    if not args.model and not args.alias:  # (an alias names its one model for good)
        entry["discover"] = True  # serve re-reads the upstream's model list when it starts
    copy_options(args, entry, SERVER_OPTIONS)
    append_server(path, entry)
    shown = ", ".join(models[:10]) + (" …" if len(models) > 10 else "")
    if args.alias:
        shown = f"{args.alias} -> {shown}"
    print(f"added {args.name}: {url} ({len(models)} model{'s' if len(models) != 1 else ''}"
          f"{': ' + shown if models else ''}){' [not checked]' if args.no_check else ''}")
    return 0


def add_managed(args, environ, path):
    """`add NAME --command '...'`: a server llmhost starts on demand and stops when idle."""
    import asyncio
    if args.url:
        raise CLIError("a --command entry has no URL: llmhost picks its port (${PORT})")
    if "${PORT}" not in args.command:
        raise CLIError("the command must take its port from ${PORT}, e.g. "
                       "'llama-server -m model.gguf --port ${PORT}'")
    problem = check_command(args.command, environ)
    if problem:
        raise CLIError(f"cannot run the command: {problem}")
    if find_server(load_registry(path), args.name):
        raise CLIError(f"a server named {args.name!r} already exists in {path}")
    entry = {"name": args.name, "command": args.command, "models": list(dict.fromkeys(
        args.model or ()))}
    copy_options(args, entry, SERVER_OPTIONS + ("ttl", "ready_path", "start_timeout", "cwd",
                                                "group"))
    if args.env:
        entry["env"] = parse_pairs(args.env, "=", "--env")
    try:
        validate_registry({"version": REGISTRY_VERSION, "servers": [entry], "mcpServers": {
            name: {"command": "x"} for name in entry.get("mcp", ())}}, path)
    except RegistryError as exc:
        raise CLIError(str(exc)) from None
    if args.check:
        listed = asyncio.run(check_managed(entry, path, environ))
        missing = [m for m in entry["models"] if m not in listed]
        if missing:
            raise CLIError(f"the server started but does not list {', '.join(missing)}; it "
                           f"lists: {', '.join(listed) or '(no models)'}")
        entry["models"] = entry["models"] or listed
    if not entry["models"]:
        raise CLIError("name the model(s) it serves with --model (or use --check to list them)")
    append_server(path, entry)
    ttl = entry.get("ttl", MANAGED_TTL)
    print(f"added {args.name}: started on demand by `{args.command}` ({', '.join(entry['models'])};"
          f" {f'stopped after {ttl:g}s idle' if ttl else 'never stopped for idling'})")
    return 0


async def check_managed(entry, path, environ):
    """Start a managed entry once, list its models, stop it (add --check)."""
    import asyncio
    sweeper = Sweeper()
    ticker = asyncio.get_running_loop().create_task(sweeper.run())
    client = UpstreamClient(sweeper)
    manager = ProcessManager(path, dict(environ), client)
    up = Upstream(dict(entry, discover=True), entry_api_key(entry, environ))
    manager.sync({up.name: up})
    server = manager.servers[up.name]
    try:
        await manager.ensure(up)
        _, doc = await fetch_models(client, up)
        return list_models(doc) or []
    except (ServiceUnavailable, UpstreamError) as exc:
        raise CLIError(f"--check failed: {getattr(exc, 'message', exc)}") from None
    finally:
        await manager.stop(server, "check done")
        client.close_all()
        ticker.cancel()


def cmd_remove(args, environ):
    path = registry_path(args, environ)

    def change(doc):
        entry = find_server(doc, args.name)
        if entry is None:
            known = ", ".join(e["name"] for e in doc["servers"]) or "none"
            raise RegistryError(f"no server named {args.name!r} in {path} (known: {known})")
        doc["servers"].remove(entry)

    update_registry(path, change)
    print(f"removed {args.name}")
    return 0


def cmd_list(args, environ):
    doc = load_registry(registry_path(args, environ))
    if args.json:
        print(json.dumps([public_entry(e) for e in doc["servers"]], indent=2))
        return 0
    if not doc["servers"]:
        print("no servers registered; add one with: llmhost.py add NAME URL", file=sys.stderr)
        return 0
    rows = []
    for e in doc["servers"]:
        models = [e["alias"] + " -> " + e["models"][0]] if e.get("alias") else e.get("models", [])
        text = ", ".join(models[:4]) + (f" (+{len(models) - 4})" if len(models) > 4 else "")
        if e.get("discover"):
            text = (text + " " if text else "") + "[all listed]"
        if e.get("native"):
            text = (text + " " if text else "") + f"[native: {', '.join(e['native'])}]"
        rows.append([e["name"], hide_password(e.get("url") or f"(managed) {e['command']}"[:60]),
                     text or "-", auth_source(e)])
    print_table(rows, ["NAME", "URL", "MODELS", "AUTH"])
    return 0


def cmd_show(args, environ):
    path = registry_path(args, environ)
    entry = find_server(load_registry(path), args.name)
    if entry is None:
        raise CLIError(f"no server named {args.name!r} in {path}")
    shown = public_entry(entry)
    width = max(len(k) for k in shown)
    for key, value in shown.items():
        if isinstance(value, list):
            value = ", ".join(value) or "-"
        print(f"{key.ljust(width)}  {value}")
    return 0


def env_api_keys(environ):
    return [k.strip() for k in environ.get("LLMHOST_API_KEY", "").split(",") if k.strip()]


def parse_api_keys(args, environ):
    """--api-key (repeatable), else $LLMHOST_API_KEY: the flag wins, as every flag wins over
    its variable, so a key replaced on the command line is not still taken from the old one."""
    keys = [k.strip() for k in args.api_key or ()]
    if "" in keys:
        raise CLIError("--api-key needs a value (an empty key could never be sent)")
    if keys:
        return keys
    keys = env_api_keys(environ)
    if not keys and environ.get("LLMHOST_API_KEY", "").strip():
        raise CLIError("LLMHOST_API_KEY holds no key, only commas and blanks: set a key, or "
                       "unset it to serve without one")
    return keys


def cmd_serve(args, environ):
    import logging
    for flag, value, least in (("--port", args.port, 0),
                               ("--max-concurrency", args.max_concurrency, 1),
                               ("--queue-size", args.queue_size, 0),
                               ("--queue-timeout", args.queue_timeout, 0),
                               ("--shutdown-timeout", args.shutdown_timeout, 0),
                               ("--max-running", args.max_running, 1),
                               ("--mcp-max-rounds", args.mcp_max_rounds, 1)):
        if value is not None and value < least:
            raise CLIError(f"{flag} must be at least {least}")
    if args.port > 65535:
        raise CLIError("--port must be at most 65535")
    for prefix in args.mcp_allow_url or ():
        reason = valid_url(prefix) or ("@" in prefix or "\\" in prefix) and "it has '@' or '\\'"
        if reason:
            raise CLIError(f"--mcp-allow-url {prefix!r}: {reason} (example: "
                           "http://127.0.0.1:8931/mcp)")
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S")
    path = registry_path(args, environ)
    key_labels = None
    if args.api_keys_file:
        try:
            key_labels = read_api_keys_file(args.api_keys_file)
        except ValueError as exc:
            raise CLIError(f"--api-keys-file: {exc}") from None
    keys = [k.strip() for k in args.api_key or ()] if key_labels else \
        parse_api_keys(args, environ)  # (with a file, $LLMHOST_API_KEY is not read)
    if "" in keys:
        raise CLIError("--api-key needs a value (an empty key could never be sent)")
    loopback = is_loopback_host(args.host)
    if key_labels:
        keys = keys + [k for k in key_labels if k not in keys]
    if not loopback and not keys and not args.no_auth:
        raise CLIError(f"refusing to serve on {args.host} without an API key: anyone who can "
                       "reach this machine could use your models. Pass --api-key KEY (or set "
                       "LLMHOST_API_KEY), or --no-auth to serve openly on purpose.")
    try:
        workers = min(os.cpu_count() or 1, args.max_concurrency) if args.workers == "auto" \
            else int(args.workers)
    except ValueError:
        workers = 0
    if workers < 1:
        raise CLIError("--workers must be at least 1 (or auto)")
    if workers > args.max_concurrency:
        raise CLIError(f"--max-concurrency {args.max_concurrency} cannot be split across "
                       f"{workers} workers (each needs at least 1): raise it or use fewer workers")
    discover_ports = None if args.no_discover else \
        parse_ports(args.discover_ports, "--discover-ports") if args.discover_ports else \
        DISCOVERY_PORTS
    # a broken registry stops serve before it binds
    last_good = serving_registry(path, environ, workers > 1)
    options = dict(environ=environ, api_keys=keys, queue_timeout=args.queue_timeout,
                   discover_ports=discover_ports,
                   allowed_hosts=args.allowed_host or () if loopback else None,
                   cors_origins=args.cors_origin or (), mcp_max_rounds=args.mcp_max_rounds,
                   max_running=args.max_running,
                   mcp_allow_urls=args.mcp_allow_url or (), mcp_roots=args.root or (),
                   store_responses=not args.no_store, metrics_public=args.metrics_public,
                   key_labels=key_labels,
                   mcp_expose=[n.strip() for n in args.mcp_expose.split(",") if n.strip()]
                   if args.mcp_expose is not None else None,
                   # signs /mcp session ids: every worker takes every worker's sessions
                   mcp_secret=os.urandom(32), mcp_workers=workers > 1)
    logging.getLogger("mcp").setLevel(logging.WARNING)  # the SDK logs tracebacks at INFO
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per MCP HTTP message
    for handler in logging.getLogger().handlers:
        handler.addFilter(one_line_sdk_errors)
        handler.addFilter(no_url_passwords)
    try:
        if workers == 1:
            return run_worker(args, path, keys, options, args.max_concurrency, args.queue_size)
        import tempfile  # where each worker publishes its /metrics figures for the others
        options["metrics_dir"] = tempfile.mkdtemp(prefix="llmhost-metrics-")
        return run_workers(args, path, keys, options, workers, last_good)
    finally:
        # (a worker never gets here: it leaves by os._exit, and never wrote a record)
        remove_serve_record(path)
        if options.get("metrics_dir"):
            import shutil
            shutil.rmtree(options["metrics_dir"], ignore_errors=True)


def serve_api(args, environ, path, method="GET"):
    """Call a running serve's API (for status, ps, load, unload) -> the JSON answer."""
    key = args.api_key or next(iter(env_api_keys(environ)), None)
    base, whose = args.url, None
    if base is None:
        registry = registry_path(args, environ)
        record, why = read_serve_record(registry)
        if record is not None:
            base = record["url"]
            whose = (f"the serve of {registry} (pid {record['pid']}, per "
                     f"{serve_record_path(registry)}) does not answer")
        else:
            base = DEFAULT_SERVE_URL
            whose = f"no serve of {registry} is running ({why}); start one or pass --url"
    reason = valid_url(base)
    if reason:
        raise CLIError(f"invalid --url {base!r}: {reason} (example: http://127.0.0.1:4000)")
    base = base.rstrip("/")
    url = (base[:-3] if base.endswith("/v1") else base) + path  # the base URL clients use
    try:
        status, doc, text = http_json(url, key, None if method == "GET"
                                      else MANAGED_START_TIMEOUT + 10, method)  # load waits
    except CLIError as exc:
        if whose is None:
            raise
        raise CLIError(f"{whose} ({exc})") from None
    if status != 200 or not isinstance(doc, dict):
        message = (doc or {}).get("error", {}).get("message") if isinstance(doc, dict) else text
        raise CLIError(f"{method} {url} -> HTTP {status}: {message}")
    return doc


def chat_client(args, environ):
    """-> (ChatClient, LocalGateway or None): --url; else the serve of the registry, per its
    record; else a gateway in this process over the registry."""
    key = environ.get(args.api_key_env) if args.api_key_env else \
        next(iter(env_api_keys(environ)), None)
    if args.api_key_env and not key:
        raise CLIError(f"--api-key-env {args.api_key_env}: that variable is not set")
    base = args.url
    if base is None:
        record, _ = read_serve_record(registry_path(args, environ))
        base = record and record["url"]
    if base is not None:
        reason = valid_url(base)
        if reason:
            raise CLIError(f"invalid --url {base!r}: {reason} (example: http://127.0.0.1:4000)")
        base = base.rstrip("/")
        client = ChatClient(base[:-3] if base.endswith("/v1") else base, key)
        try:
            conn, _ = client.send("GET", "/v1/models")
            conn.close()  # it answers (a refusal, as of a wrong key, is said when used)
            return client, None
        except CLIError:  # (nothing answered)
            if args.url is not None:
                raise
    # (a serve whose record is stale or that does not answer: the registry, here)
    local = LocalGateway(registry_path(args, environ), environ)
    return ChatClient(unix=local.path), local


def cmd_chat(args, environ):
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    images = [image_data_url(p) for p in args.image or ()]
    system, messages = load_conversation(args.load) if args.load else (None, [])
    client, local = chat_client(args, environ)
    try:
        model = args.model or chat_pick_model(client, tty)
        session = ChatSession(client, model, sys.stdout, system=args.system or system,
                              messages=messages, images=images, no_mcp=args.no_mcp,
                              as_json=args.json, tty=tty)
        if not tty:
            text = sys.stdin.read()
            if not text.strip():
                raise CLIError("nothing to send: give the message on standard input")
            session.ask(text.rstrip("\n"))
            return 0
        try:
            import readline  # (input() then has line editing and history)
        except ImportError:
            readline = None
        history = os.path.join(environ["HOME"], ".llmhost_history") \
            if readline is not None and environ.get("HOME") else None
        if history:
            readline.set_history_length(CHAT_HISTORY_LINES)
            try:
                readline.read_history_file(history)
            except OSError:
                pass
        if messages:
            session.write(f"loaded {len(messages)} messages from {args.load}", dim=True)
            session.write("\n")
        try:
            return session.loop()
        finally:
            if history:
                try:
                    readline.write_history_file(history)
                    os.chmod(history, 0o600)  # what was typed may be private
                except OSError:
                    pass
    finally:
        if local is not None:
            local.close()


def cmd_ps(args, environ):
    doc = serve_api(args, environ, "/v1/status")
    rows = [[p["name"], p["state"], p["pid"] or "-", p["port"] or "-",
             "-" if p["uptime_seconds"] is None else f"{p['uptime_seconds']:g}s",
             f"{p['idle_seconds']:g}s", p["in_flight"], p["last_error"] or "-"]
            for p in doc.get("processes", ())]
    if not rows:
        print("no managed servers (add one with: llmhost.py add NAME --command '...')",
              file=sys.stderr)
        return 0
    print_table(rows, ["NAME", "STATE", "PID", "PORT", "UPTIME", "IDLE", "IN-FLIGHT",
                       "LAST ERROR"])
    return 0


def cmd_load(args, environ):
    from urllib.parse import quote
    doc = serve_api(args, environ, f"/v1/processes/{quote(args.name)}/{args.action}", "POST")
    print(f"{args.name}: {doc['state']}" + (f" (pid {doc['pid']}, port {doc['port']})"
                                             if doc.get("pid") else ""))
    return 0


def cmd_logs(args, environ):
    path = os.path.join(logs_folder(registry_path(args, environ)), f"{args.name}.log")
    if not os.path.exists(path):
        raise CLIError(f"no log for {args.name!r} yet ({path}); serve writes one for each server "
                       "it starts itself (--command entries)")
    with open(path, "rb") as f:
        data = f.read()
        lines = data.splitlines()[-args.lines:] if args.lines > 0 else []
        sys.stdout.write(b"\n".join(lines).decode("utf-8", "replace") + "\n" if lines else "")
        sys.stdout.flush()
        while args.follow:
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
            else:
                time.sleep(0.3)
    return 0


def parse_ports(text, flag):
    """"N,N" -> {port: name} as discover_servers takes it (a port given is named local<N>)."""
    try:
        ports = {int(p): f"local{int(p)}" for p in text.split(",")}
    except ValueError:
        ports = {}
    if not ports or not all(0 < p < 65536 for p in ports):
        raise CLIError(f"{flag} takes port numbers (1-65535) separated by commas")
    return ports


def cmd_discover(args, environ):
    ports = parse_ports(args.ports, "--ports") if args.ports else DISCOVERY_PORTS
    found = discover_servers(ports)
    if not found:
        print("found no OpenAI-compatible server on the usual local ports "
              f"({', '.join(map(str, ports))})")
        return 1
    path = registry_path(args, environ)
    known = {e.get("url") for e in load_registry(path)["servers"]}
    for name, url, ids in found:
        shown = ", ".join(ids[:6]) + (" …" if len(ids) > 6 else "")
        print(f"{name:10} {url:28} {shown or '(no models)'}"
              f"{'  [registered]' if url in known else ''}")
    if args.add:
        added = []

        def change(doc):
            names = {e["name"] for e in doc["servers"]}
            urls = {e.get("url") for e in doc["servers"]}
            for name, url, ids in found:
                if url in urls:
                    continue
                unique = name
                while unique in names:
                    unique += "-2"
                doc["servers"].append({"name": unique, "url": url, "models": ids,
                                       "discover": True})
                names.add(unique)
                added.append(unique)

        update_registry(path, change)
        print(f"added: {', '.join(added) or 'nothing new'}")
    else:
        print("register them with: llmhost.py discover --add")
    return 0


def cmd_status(args, environ):
    doc = serve_api(args, environ, "/v1/status")
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"llmhost {doc['version']} up {doc['uptime_seconds']:g}s: {doc['in_flight']} in flight "
          f"of {doc['max_concurrency']}, {doc['queued']} queued, {doc['rejected']} rejected")
    rows = [[s["name"], "ok" if s["healthy"] else f"cooling {s['cooldown_seconds']:g}s",
             s["in_flight"], s["requests"], s["errors"], s["last_error"] or "-"]
            for s in doc["servers"]]
    print_table(rows, ["SERVER", "HEALTH", "IN-FLIGHT", "REQUESTS", "ERRORS", "LAST ERROR"])
    clients = doc.get("mcp_clients")  # (a serve from before /mcp has none)
    if clients and (clients["sessions"] or clients["streams"] or clients["requests"]):
        print(f"\nMCP clients (/mcp): {len(clients['sessions'])} sessions, "
              f"{clients['streams']} open streams, {clients['requests']} requests under way")
        print_table([[s["client"] or "-", s["view"], s["version"], s["requests"], s["calls"],
                      s["streams"], f"{s['idle_seconds']}s"] for s in clients["sessions"]],
                    ["CLIENT", "PATH", "VERSION", "REQUESTS", "CALLS", "STREAMS", "IDLE"])
    return 0


def cmd_bench(args, environ):
    """Exit 0 when every request succeeded, 1 when any failed (or none finished), 130 when
    Ctrl-C cut the run short (after printing what finished)."""
    import asyncio
    import math
    for flag, value, least in (("--concurrency", args.concurrency, 1),
                               ("--requests", args.requests, 1),
                               ("--prompt-tokens", args.prompt_tokens, 1),
                               ("--max-tokens", args.max_tokens, 1)):
        if value is not None and value < least:
            raise CLIError(f"{flag} must be at least {least}")
    for flag, value in (("--duration", args.duration), ("--timeout", args.timeout),
                        ("--ramp", args.ramp)):
        if value is not None and not (math.isfinite(value) and (value > 0 or (
                flag == "--ramp" and value == 0))):
            raise CLIError(f"{flag} must be seconds > 0" + (" (or 0)" if flag == "--ramp" else ""))
    if not args.duration and not args.requests:
        args.requests = 100
    reason = valid_url(args.url)
    if reason:
        raise CLIError(f"invalid URL {args.url!r}: {reason}")
    key = args.api_key
    if args.api_key_env:
        key = environ.get(args.api_key_env)
        if not key:
            raise CLIError(f"--api-key-env: ${args.api_key_env} is not set")
    result = asyncio.run(bench_run(args, key))
    code = 130 if result["interrupted"] else 1 if result["errors"] or not result["requests"] \
        else 0
    if args.json:
        print(json.dumps(result, indent=2))
        return code
    n = result["requests"]
    print(f"{n} request{'' if n == 1 else 's'} in {result['seconds']:.2f}s at concurrency "
          f"{result['concurrency']}{' (stream)' if args.stream else ''}: "
          f"{result['requests_per_second']:.1f} req/s, "
          f"{result['output_tokens_per_second']:.1f} output tokens/s"
          + (" (interrupted)" if result["interrupted"] else ""))
    rows = []
    for label, key_ in (("latency", "latency_ms"), ("time to first token", "ttft_ms"),
                        ("inter-token", "itl_ms")):
        st = result[key_]
        if st:
            rows.append([label] + [f"{st[k]:.2f}" for k in ("mean", "p50", "p90", "p99")])
    if rows:
        print_table(rows, ["ms", "mean", "p50", "p90", "p99"])
    if result["unfinished"]:
        print(f"unfinished: {result['unfinished']} (still open when the run ended; not counted)")
    for kind, count in sorted(result["errors"].items()):
        print(f"errors: {kind}: {count} (first: {result['error_messages'][kind]})")
    return code


def parse_pairs(items, sep, what):
    out = {}
    for item in items or ():
        key, found, value = item.partition(sep)
        if not found or not key.strip():
            raise CLIError(f"{what} {item!r}: expected KEY{sep.strip() or sep}VALUE")
        out[key.strip()] = value.strip() if sep == ":" else value
    return out


# --flag -> the key of an entry's `oauth` object it sets
MCP_OAUTH_FLAGS = {"--client-id": "client_id", "--client-secret-env": "client_secret_env",
                   "--client-metadata-url": "client_metadata_url", "--scope": "scope",
                   "--client-credentials": "client_credentials", "--client-key": "client_key",
                   "--callback-port": "callback_port"}


def mcp_entry_from_args(args):
    """The mcpServers entry `mcp add` (or an ad-hoc --url / -- COMMAND) describes."""
    if args.url and args.cmd:
        raise CLIError("give either --url URL or -- COMMAND ARGS, not both")
    oauth = {key: getattr(args, key, None) for key in MCP_OAUTH_FLAGS.values()
             if getattr(args, key, None) not in (None, False)}
    misplaced = [flag for flag, given in (
        ("--header", getattr(args, "header", None) and args.cmd),
        ("--transport", getattr(args, "transport", None) and args.cmd),
        ("--env", getattr(args, "env", None) and args.url),
        ("--cwd", getattr(args, "cwd", None) and args.url)) if given]
    misplaced += [flag for flag, key in MCP_OAUTH_FLAGS.items() if key in oauth and args.cmd]
    if misplaced:
        raise CLIError(f"{', '.join(misplaced)}: "
                       f"{'only with --url' if args.cmd else 'only for a -- COMMAND (stdio)'}")
    if oauth and not args.url:
        raise CLIError(f"{', '.join(f for f, k in MCP_OAUTH_FLAGS.items() if k in oauth)}: only "
                       "with --url (a registered server's OAuth settings are in its entry)")
    if args.url:
        entry = {"url": args.url}
        headers = parse_pairs(getattr(args, "header", None), ":", "--header")
        if headers:
            entry["headers"] = headers
        if getattr(args, "transport", None) == "sse":
            entry["type"] = "sse"
        if "client_key" in oauth:  # (serve may start in another folder)
            oauth["client_key"] = os.path.abspath(os.path.expanduser(oauth["client_key"]))
        if oauth:
            entry["oauth"] = oauth
    elif args.cmd:
        entry = {"command": args.cmd[0], "args": args.cmd[1:]}
        env = parse_pairs(getattr(args, "env", None), "=", "--env")
        if env:
            entry["env"] = env
        if getattr(args, "cwd", None):
            entry["cwd"] = args.cwd
    else:
        return None
    for field in ("timeout", "sampling_model"):
        if getattr(args, field, None) is not None:
            entry[field] = getattr(args, field)
    return entry


def mcp_target(args, environ, words):
    """(name, entry, remaining words): an ad-hoc server if --url / -- COMMAND, else the
    registered server named by the first word."""
    entry = mcp_entry_from_args(args)
    if entry is not None:
        return "adhoc", entry, words
    if not words:
        raise CLIError("name a registered MCP server, or give --url URL or -- COMMAND ARGS")
    doc = load_registry(registry_path(args, environ))
    entry = doc["mcpServers"].get(words[0])
    if entry is None:
        raise CLIError(f"no MCP server named {words[0]!r} (registered: "
                       f"{', '.join(doc['mcpServers']) or 'none'})")
    return words[0], entry, words[1:]


class LoopbackLogin:
    """The browser step of an OAuth login, on a console: a listener on a loopback port for the
    redirect (RFC 8252 §7.3), the authorization URL opened with `opener` (the standard library's
    webbrowser.open, which honours $BROWSER) and printed on `out`, so that on a machine without
    a browser it can be opened elsewhere and the address the browser ends at pasted back on
    `paste` (the file descriptor of a terminal, read by the event loop, never by a thread that
    would hold stdin's lock at exit; None: not asked for). The SDK's provider calls open() and
    callback();
    redirect_uri() comes first, before the URI is registered or sent."""

    PHRASES = {200: "OK", 400: "Bad Request", 404: "Not Found", 409: "Conflict",
               431: "Request Header Fields Too Large"}

    def __init__(self, opener, out, paste=None, timeout=MCP_LOGIN_TIMEOUT):
        self.opener, self.out, self.paste, self.timeout = opener, out, paste, timeout
        self.listener = self.port = self.uri = self.server = None
        self.state = self.result = self.loop = None
        self.pasted = None  # bytes of a line being pasted; None: the loop does not read paste

    async def redirect_uri(self, port, required, server):
        """Listen on 127.0.0.1:`port` (any free port for 0, or when `port` is taken and not
        `required`) -> the redirect URI."""
        import asyncio
        import socket
        self.server = server
        if self.listener is not None and port in (0, self.port):
            return self.uri
        await self.close()
        sock = socket.socket()
        # (the port of an earlier login may have connections in TIME_WAIT still)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError as exc:
                if required or not port:
                    raise RuntimeError(f"cannot listen on 127.0.0.1:{port} for the browser's "
                                       f"redirect: {exc.strerror}") from None
                sock.bind(("127.0.0.1", 0))
            sock.listen(8)
            self.listener = await asyncio.start_server(self._serve, sock=sock)
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}/callback"
        return self.uri

    async def open(self, url):
        """Open the authorization URL (in a thread: a $BROWSER command is waited for) and say
        it; the redirect is awaited by callback()."""
        import asyncio
        import threading
        from urllib.parse import parse_qs, urlsplit
        self.loop = asyncio.get_running_loop()
        self.state = (parse_qs(urlsplit(url).query).get("state") or [None])[0]
        self.result = self.loop.create_future()
        print(f"llmhost: MCP server {self.server!r} wants a login. Opening a browser at:\n  {url}\n"
              f"Waiting up to {self.timeout:g} s for it to come back to {self.uri}." +
              ("\nWithout a browser here: open the address anywhere, log in, and paste here "
               "the address the browser ends at." if self.paste is not None else ""),
              file=self.out, flush=True)
        threading.Thread(target=self._open, args=(url,), daemon=True).start()
        if self.paste is not None and self.pasted is None:
            try:
                self.loop.add_reader(self.paste, self._read_pasted)
                self.pasted = b""
            except (NotImplementedError, ValueError, OSError):  # (no selector loop: Windows)
                pass

    def _open(self, url):
        try:
            self.opener(url)
        except Exception:  # (the address is printed: the user opens it)
            pass

    async def callback(self):
        """The code, state and iss the browser came back with."""
        import asyncio
        try:
            return await asyncio.wait_for(asyncio.shield(self.result), self.timeout)
        except asyncio.TimeoutError:
            raise RuntimeError(f"no login within {self.timeout:g} s") from None
        finally:
            await self.close()

    async def close(self):
        if self.pasted is not None:
            self.loop.remove_reader(self.paste)
            self.pasted = None
        if self.listener is not None:
            # (not wait_closed(): it would wait for a browser's idle extra connection too)
            self.listener.close()
            self.listener = None

    def _take(self, query):
        """The query of an address the browser came back to -> (status, what it is shown)."""
        from urllib.parse import parse_qs

        from mcp.shared.auth import AuthorizationCodeResult
        params = {k: v[0] for k, v in parse_qs(query).items()}
        if self.result is None or self.result.done():
            return 409, "llmhost is not waiting for a login."
        if self.state is not None and params.get("state") != self.state:
            return 400, "This is not the address of the login llmhost is waiting for."
        if "error" in params:
            reason = re.sub(r"[^ -~]", "?", " ".join(
                filter(None, (params["error"], params.get("error_description")))))[:300]
            self.result.set_exception(RuntimeError(f"the login was refused ({reason})"))
            return 200, "The login was refused; llmhost says more in the terminal."
        if not params.get("code"):
            return 400, "The address has no authorization code."
        self.result.set_result(AuthorizationCodeResult(
            code=params["code"], state=params.get("state"), iss=params.get("iss")))
        return 200, "Logged in. This tab can be closed."

    async def _serve(self, reader, writer):
        import asyncio
        import html
        status, text = 400, "Bad request."
        try:
            line = await asyncio.wait_for(reader.readline(), HEADER_TIMEOUT)
            for _ in range(MCP_CALLBACK_HEAD_LINES):
                if not (await asyncio.wait_for(reader.readline(), HEADER_TIMEOUT)).strip():
                    break
            else:
                line, status, text = b"", 431, "Too many header lines."
            parts = line.split()
            if len(parts) == 3 and parts[0] == b"GET":
                path, _, query = parts[1].decode("latin-1").partition("?")
                status, text = self._take(query) if path == "/callback" else (404, "Not found.")
        except (asyncio.TimeoutError, ValueError, OSError):
            pass
        body = f"<!doctype html><title>llmhost</title><p>{html.escape(text)}</p>\n".encode()
        try:
            writer.write(f"HTTP/1.1 {status} {self.PHRASES[status]}\r\nContent-Type: text/html; "
                         f"charset=utf-8\r\nContent-Length: {len(body)}\r\nConnection: close"
                         "\r\n\r\n".encode() + body)
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    def _read_pasted(self):
        from urllib.parse import urlsplit
        try:
            data = os.read(self.paste, 4096)
        except OSError:
            data = b""
        if not data:  # (the end of the input: nothing more can be pasted)
            self.loop.remove_reader(self.paste)
            return
        self.pasted += data
        while self.pasted is not None and b"\n" in self.pasted:
            line, self.pasted = self.pasted.split(b"\n", 1)
            line = line.decode("utf-8", "replace").strip()
            if line:
                status, text = self._take(urlsplit(line).query if "?" in line else line)
                if status != 200:
                    print(f"llmhost: {text}", file=self.out, flush=True)


def cli_login():
    """The browser step the CLI's MCP commands take when a server asks for a login."""
    def opener(url):
        import webbrowser
        webbrowser.open(url)

    return LoopbackLogin(opener, sys.stderr, sys.stdin.fileno() if sys.stdin.isatty() else None)


def mcp_session(name, entry, args, environ, action):
    """run_mcp(with_mcp_server(...)) as the CLI's commands do it: with the registry's token
    file, and the browser step when the server asks for a login."""
    return run_mcp(with_mcp_server(name, entry, environ, action,
                                   tokens=tokens_path(registry_path(args, environ)),
                                   login=cli_login()))


def run_mcp(coro):
    """Run an MCP command's coroutine. SIGTERM ends it as Ctrl-C does, through its cleanup,
    so a stdio server it started (one that ignores its closed stdin too) is stopped."""
    import asyncio
    import logging
    import signal
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    # The SDK logs a failed OAuth flow with its traceback; the command's error says why.
    logging.getLogger("mcp.client.auth").setLevel(logging.CRITICAL)

    async def run():
        loop, task = asyncio.get_running_loop(), asyncio.current_task()

        def stop():  # once: a second SIGTERM during the cleanup ends us at once
            loop.remove_signal_handler(signal.SIGTERM)
            task.cancel()
        try:
            loop.add_signal_handler(signal.SIGTERM, stop)
        except (NotImplementedError, RuntimeError, ValueError):  # (not POSIX, not main thread)
            pass
        return await coro

    try:
        return asyncio.run(run())
    except MCPError as exc:
        raise CLIError(exc.message) from None
    except asyncio.CancelledError:  # SIGTERM: exit as the signal would have
        raise SystemExit(128 + signal.SIGTERM) from None


def cmd_mcp_add(args, environ):
    path = registry_path(args, environ)
    entry = mcp_entry_from_args(args)
    if entry is None:
        raise CLIError("give --url URL, or -- COMMAND ARGS for a stdio server")
    relative = [a for a in [entry.get("command", "")] + entry.get("args", [])
                if "cwd" not in entry and not a.startswith("-") and not os.path.isabs(a)
                and os.path.isfile(a)]
    if relative:  # found from here now; serve (systemd, another shell) may start elsewhere
        entry["cwd"] = os.getcwd()
        print(f"note: {relative[0]!r} is a path from this folder: saved with cwd {entry['cwd']}"
              " (--cwd DIR to choose)", file=sys.stderr)
    if args.private:
        entry["private"] = True
    errors = validate_mcp_entry(args.name, entry)
    if errors:
        raise CLIError("; ".join(errors))
    if args.name in load_registry(path)["mcpServers"]:
        raise CLIError(f"an MCP server named {args.name!r} already exists; remove it first")
    tools = []
    if not args.no_check:
        tools = mcp_session(args.name, entry, args, environ,
                            lambda hub: hub.describe_tools(args.name))

    def change(doc):
        if args.name in doc["mcpServers"]:
            raise RegistryError(f"an MCP server named {args.name!r} was added meanwhile")
        doc["mcpServers"][args.name] = entry

    update_registry(path, change)
    shown = ", ".join(t["name"] for t in tools[:8]) + (", ..." if len(tools) > 8 else "")
    listed = f": {len(tools)} tool{'s' if len(tools) != 1 else ''} ({shown})" if tools else ""
    print(f"added MCP server {args.name}{listed}{' [not checked]' if args.no_check else ''}")
    return 0


def cmd_mcp_serve(args, environ):
    """llmhost as a stdio MCP server: one registered server (any transport) or all of them,
    for clients that only start stdio servers (Claude Desktop's config). Logs go to stderr;
    stdout carries only JSON-RPC."""
    import asyncio
    doc = load_registry(registry_path(args, environ))
    specs = doc["mcpServers"]
    if args.name is not None and args.name not in specs:
        raise CLIError(f"no MCP server named {args.name!r}; registered: "
                       f"{', '.join(specs) or 'none'}")

    async def serve():
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_BODY_BYTES)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        out = sys.stdout.buffer

        def write(msg):
            out.write(json_bytes(msg) + b"\n")
            out.flush()

        hub = MCPHub(specs, environ=environ, sampler=no_model_to_sample,
                     tokens=tokens_path(registry_path(args, environ)))
        front = MCPFront(hub, expose=None if args.name is None else [args.name])
        try:
            await front.serve_stdio(args.name, reader, write)
        finally:
            await hub.aclose()

    return run_mcp(serve()) or 0


def cmd_mcp_remove(args, environ):
    path = registry_path(args, environ)
    detached = []

    def change(doc):
        if args.name not in doc["mcpServers"]:
            raise RegistryError(f"no MCP server named {args.name!r} (registered: "
                                f"{', '.join(doc['mcpServers']) or 'none'})")
        del doc["mcpServers"][args.name]
        for entry in doc["servers"]:
            if args.name in entry.get("mcp", ()):
                entry["mcp"] = [n for n in entry["mcp"] if n != args.name]
                detached.append(entry["name"])

    update_registry(path, change)
    store = MCPTokenStore(tokens_path(path))
    if store.stamp() is not None:  # (its tokens and client registration go with it)
        store.change(lambda servers: servers.pop(args.name, None))
    print(f"removed MCP server {args.name}" +
          (f" (detached from {', '.join(detached)})" if detached else ""))
    return 0


def cmd_mcp_list(args, environ):
    doc = load_registry(registry_path(args, environ))
    users = {}
    for entry in doc["servers"]:
        for name in entry.get("mcp", ()):
            users.setdefault(name, []).append(entry["name"])
    shown = {n: dict(e, url=hide_password(e["url"])) if "url" in e else e
             for n, e in doc["mcpServers"].items()}  # secrets are never printed: nor are values
    if args.json:  # of env and headers (only their names)
        print(json.dumps([dict(name=n, transport=mcp_transport(e), attached_to=users.get(n, []),
                               **{k: v for k, v in e.items() if k not in ("env", "headers")},
                               **{k: sorted(e[k]) for k in ("env", "headers") if k in e})
                          for n, e in shown.items()], indent=2))
        return 0
    if not doc["mcpServers"]:
        print("no MCP servers registered; add one with: llmhost.py mcp add NAME -- COMMAND",
              file=sys.stderr)
        return 0
    rows = [[n, mcp_transport(e), e.get("url") or " ".join([e["command"]] + e.get("args", [])),
             ", ".join(users.get(n, [])) or "-"] for n, e in shown.items()]
    print_table(rows, ["NAME", "TRANSPORT", "TARGET", "ATTACHED TO"])
    return 0


def cmd_mcp_import(args, environ):
    path = registry_path(args, environ)
    try:
        with open(args.file, encoding="utf-8") as f:
            source = json.load(f)
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot read {args.file}: {exc}") from None
    try:
        imported, skipped, renamed = import_mcp_json(source)
    except ValueError as exc:
        raise CLIError(f"{args.file}: {exc}; expected an mcp.json with 'mcpServers' (Claude "
                       "Desktop, Cursor, LM Studio) or 'servers' (VS Code)") from None
    added = []

    def change(doc):
        for name, entry in imported.items():
            if name in doc["mcpServers"]:
                skipped.append((name, "already registered"))
            else:
                doc["mcpServers"][name] = entry
                added.append(f"{name} (was {renamed[name]!r})" if name in renamed else name)

    update_registry(path, change)
    print(f"imported {len(added)} MCP server(s) from {args.file}: {', '.join(added) or '-'}")
    for name, reason in skipped:
        print(f"skipped {name}: {reason}")
    return 0


def cmd_mcp_attach(args, environ):
    path = registry_path(args, environ)

    def change(doc):
        entry = find_server(doc, args.server)
        if entry is None:
            raise RegistryError(f"no server named {args.server!r}")
        if args.name not in doc["mcpServers"]:
            raise RegistryError(f"no MCP server named {args.name!r}")
        names = [n for n in entry.get("mcp", ()) if n != args.name]
        if not args.attach and len(names) == len(entry.get("mcp", ())):
            raise RegistryError(f"{args.name} is not attached to {args.server}")
        if args.attach:
            names.append(args.name)
        if names:
            entry["mcp"] = names
        else:
            entry.pop("mcp", None)

    update_registry(path, change)
    print(f"{'attached' if args.attach else 'detached'} {args.name} "
          f"{'to' if args.attach else 'from'} {args.server}")
    return 0


def cmd_mcp_tools(args, environ):
    if not args.words and not args.url and not args.cmd:
        doc = load_registry(registry_path(args, environ))
        targets = list(doc["mcpServers"].items())
    else:
        name, entry, _ = mcp_target(args, environ, args.words)
        targets = [(name, entry)]
    everything, failed = [], []
    for name, entry in targets:
        try:
            tools = mcp_session(name, entry, args, environ,
                                lambda hub, name=name: hub.describe_tools(name))
        except CLIError as exc:
            if len(targets) == 1:
                raise
            failed.append(exc)  # the others are still listed
            continue
        everything += [dict(tool, server=name) for tool in tools]
    taken = set()  # names unique across servers, as serve makes them for a model that has
    for tool in everything:  # all of these attached (in this order)
        tool["openai_name"] = mcp_tool_name(tool["server"], tool["name"], taken)
    if args.json:
        print(json.dumps(everything, indent=2))
    else:
        rows = [[t["openai_name"], (t.get("description") or "").split("\n")[0][:70]]
                for t in everything]
        print_table(rows, ["TOOL (as models see it)", "DESCRIPTION"])
    for exc in failed:
        print(f"llmhost: error: {exc}", file=sys.stderr)
    return 1 if failed else 0


def cmd_mcp_call(args, environ):
    name, entry, words = mcp_target(args, environ, args.words)
    if not words:
        raise CLIError("name the tool to call")
    tool, rest = words[0], words[1:]
    try:
        arguments = json_loads(rest[0]) if rest else {}
    except ValueError as exc:
        raise CLIError(f"arguments are not valid JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise CLIError("arguments must be a JSON object")
    async def call(hub):
        # List first, as models do: the SDK mirrors x-mcp-header parameters only for tools it
        # has seen, and a wrong tool name gets a clear answer.
        known = [t["tool"] for t in await hub.tools([name])]
        if tool not in known:
            raise MCPError(name, f"has no tool {tool!r} (tools: {', '.join(known) or 'none'})")
        return await hub.call(name, tool, arguments, args.timeout)

    result = mcp_session(name, entry, args, environ, call)
    if args.json:
        print(json.dumps({k: result.get(k) for k in ("ok", "text", "parts", "structured",
                                                     "duration_ms", "error")}, indent=2))
    else:
        print(result["text"])
    return 0 if result["ok"] else 1


def cmd_mcp_resources(args, environ):
    name, entry, _ = mcp_target(args, environ, args.words)
    listing = mcp_session(name, entry, args, environ, lambda hub: (
        hub.prompts(name) if args.kind == "prompts" else hub.resources(name)))
    print(json.dumps(listing, indent=2))
    return 0


def cmd_mcp_read(args, environ):
    name, entry, words = mcp_target(args, environ, args.words)
    if len(words) != 1:
        raise CLIError("name the resource to read: its URI")
    result = mcp_session(name, entry, args, environ, lambda hub: hub.read(name, words[0]))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for content in result.get("contents") or ():
        if "text" in content:
            print(content["text"])
        else:
            print(f"[{content.get('uri')}: {content.get('mimeType') or 'binary'}, "
                  f"{_b64_size(content.get('blob') or '')} bytes; --json shows them]")
    return 0


def cmd_mcp_prompt(args, environ):
    name, entry, words = mcp_target(args, environ, args.words)
    if not 1 <= len(words) <= 2:
        raise CLIError("name the prompt to get, and give its arguments as one JSON object")
    try:
        arguments = json_loads(words[1]) if len(words) > 1 else {}
    except ValueError as exc:
        raise CLIError(f"arguments are not valid JSON: {exc}") from None
    if not isinstance(arguments, dict) or not all(isinstance(v, str) for v in arguments.values()):
        raise CLIError("arguments must be a JSON object of strings (MCP prompt arguments are)")
    result = mcp_session(name, entry, args, environ,
                         lambda hub: hub.prompt(name, words[0], arguments))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if result.get("description"):
        print(f"# {result['description']}")
    for message in result.get("messages") or ():
        content = message.get("content") or {}
        text = content.get("text") if content.get("type") == "text" else \
            f"[{content.get('type')} content; --json shows it]"
        print(f"{message.get('role')}: {text}")
    return 0


def cmd_mcp_login(args, environ):
    path = registry_path(args, environ)
    entry = load_registry(path)["mcpServers"].get(args.name)
    if entry is None or "url" not in entry:
        raise CLIError(f"no HTTP MCP server named {args.name!r}: OAuth logins are for servers "
                       "added with --url")
    store = MCPTokenStore(tokens_path(path))
    url = entry["url"]

    def forget(servers):  # a new login: the tokens go, the client registration stays
        (servers.get(args.name) or {}).get(url, {}).pop("tokens", None)

    if store.stamp() is not None:
        store.change(forget)
    tools = mcp_session(args.name, entry, args, environ,
                        lambda hub: hub.describe_tools(args.name))
    count = f"{len(tools)} tool{'s' if len(tools) != 1 else ''}"
    if store.stamp() is not None and store.record(args.name, url).get("tokens"):
        print(f"logged in to {args.name} ({count}); its tokens are kept in {store.path}")
    else:
        print(f"{args.name} did not ask for a login ({count})")
    return 0


def cmd_mcp_logout(args, environ):
    store = MCPTokenStore(tokens_path(registry_path(args, environ)))
    removed = store.change(lambda servers: servers.pop(args.name, None)) \
        if store.stamp() is not None else None
    print(f"logged out of {args.name}: its tokens and client registration are removed from "
          f"{store.path}" if removed else f"no tokens are kept for {args.name}")
    return 0


def add_mcp_parsers(sub):
    import argparse
    mcp = sub.add_parser("mcp", help="MCP servers whose tools models get (see `mcp -h`)",
                         description="Register MCP servers and try their tools. Tools reach "
                         "models as <server>__<tool>; llmhost runs them.")
    msub = mcp.add_subparsers(dest="mcp_command", metavar="COMMAND")
    msub.required = True

    def target_options(p, with_words=True):
        if with_words:
            p.add_argument("words", nargs="*", help=argparse.SUPPRESS)
        p.add_argument("--url", help="an ad-hoc streamable HTTP (or SSE) server")
        p.add_argument("--header", action="append", metavar="'K: V'", help="with --url")
        p.add_argument("--transport", choices=["http", "sse"], help="with --url (default http)")
        p.add_argument("--env", action="append", metavar="K=V", help="for a stdio command")
        p.add_argument("--cwd", metavar="DIR", help="for a stdio command")
        o = p.add_argument_group("OAuth, with --url (a login starts when the server asks)")
        o.add_argument("--client-id", metavar="ID", help="a client id registered with its "
                       "authorization server (else a metadata document or registration)")
        o.add_argument("--client-secret-env", metavar="VAR",
                       help="the environment variable that holds that client's secret")
        o.add_argument("--client-metadata-url", metavar="URL",
                       help="this client's Client ID Metadata Document (https)")
        o.add_argument("--scope", metavar="'S1 S2'",
                       help="scopes to ask for, beside those the server names")
        o.add_argument("--client-credentials", action="store_true",
                       help="machine to machine: the client credentials grant, with --client-id"
                       " and --client-secret-env or --client-key")
        o.add_argument("--client-key", metavar="FILE",
                       help="a PEM private key that signs (private_key_jwt)")
        o.add_argument("--callback-port", type=int, metavar="PORT",
                       help="the loopback port the browser comes back to (default: any free)")

    p = msub.add_parser("add", help="register an MCP server: NAME -- COMMAND ARGS, or NAME --url",
                        usage="%(prog)s NAME (-- COMMAND [ARGS...] | --url URL) [options]")
    p.add_argument("name")
    target_options(p, with_words=False)
    p.add_argument("--timeout", type=float, metavar="S", help="per tool call (default 60)")
    p.add_argument("--sampling-model", metavar="MODEL",
                   help="model that answers this server's sampling requests")
    p.add_argument("--no-check", action="store_true", help="save without connecting")
    p.add_argument("--private", action="store_true",
                   help="keep it out of /mcp (llmhost as an MCP server); models still get it")
    p.set_defaults(func=cmd_mcp_add)

    p = msub.add_parser("serve", help="llmhost as an MCP server on stdin/stdout: one "
                        "registered server (NAME) or all of them (for stdio-only clients)")
    p.add_argument("name", nargs="?", help="one registered MCP server (default: all, as /mcp)")
    p.add_argument("--stdio", action="store_true", required=True,
                   help="speak MCP's stdio transport (the only one `mcp serve` has: for HTTP, "
                   "`serve` has /mcp)")
    p.set_defaults(func=cmd_mcp_serve)

    p = msub.add_parser("remove", help="unregister an MCP server")
    p.add_argument("name")
    p.set_defaults(func=cmd_mcp_remove)

    p = msub.add_parser("list", help="registered MCP servers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_mcp_list)

    p = msub.add_parser("import", help="import a Claude Desktop / Cursor / LM Studio / VS Code "
                        "mcp.json")
    p.add_argument("file")
    p.set_defaults(func=cmd_mcp_import)

    for verb, attach in (("attach", True), ("detach", False)):
        p = msub.add_parser(verb, help=f"{verb} an MCP server's tools {'to' if attach else 'from'}"
                            " every request to a server's models")
        p.add_argument("name", help="the MCP server")
        p.add_argument("server", help="the LLM server entry")
        p.set_defaults(func=cmd_mcp_attach, attach=attach)

    p = msub.add_parser("tools", help="list tools: [NAME] or an ad-hoc --url / -- COMMAND",
                        usage="%(prog)s [NAME | --url URL | -- COMMAND ARGS] [--json]")
    target_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_mcp_tools)

    p = msub.add_parser("call", help="call a tool: NAME TOOL [JSON-ARGS]",
                        usage="%(prog)s (NAME | --url URL) TOOL [JSON-ARGS] [-- COMMAND ARGS]")
    target_options(p)
    p.add_argument("--timeout", type=float, metavar="S")
    p.add_argument("--json", action="store_true", help="the whole result as JSON")
    p.set_defaults(func=cmd_mcp_call)

    for kind in ("resources", "prompts"):
        p = msub.add_parser(kind, help=f"list a server's {kind}: NAME or ad-hoc")
        target_options(p)
        p.set_defaults(func=cmd_mcp_resources, kind=kind)

    p = msub.add_parser("read", help="read a resource: NAME URI",
                        usage="%(prog)s (NAME | --url URL) URI [--json] [-- COMMAND ARGS]")
    target_options(p)
    p.add_argument("--json", action="store_true", help="the whole result as JSON")
    p.set_defaults(func=cmd_mcp_read)

    p = msub.add_parser("prompt", help="get a prompt: NAME PROMPT [JSON-ARGS]",
                        usage="%(prog)s (NAME | --url URL) PROMPT [JSON-ARGS] [--json] "
                        "[-- COMMAND ARGS]")
    target_options(p)
    p.add_argument("--json", action="store_true", help="the whole result as JSON")
    p.set_defaults(func=cmd_mcp_prompt)

    p = msub.add_parser("login", help="log in to an HTTP MCP server (OAuth), anew")
    p.add_argument("name")
    p.set_defaults(func=cmd_mcp_login)

    p = msub.add_parser("logout", help="forget an MCP server's OAuth tokens and registration")
    p.add_argument("name")
    p.set_defaults(func=cmd_mcp_logout)


SERVE_URL_HELP = (f"where serve listens (default: where the serve of the registry says it "
                  f"does, in REGISTRY.serve; else {DEFAULT_SERVE_URL})")


def build_parser():
    import argparse
    parser = argparse.ArgumentParser(
        prog="llmhost.py", description="One OpenAI-compatible endpoint for your LLM servers.",
        epilog="Registry: --registry PATH, else $LLMHOST_REGISTRY, else ./servers.json")
    parser.add_argument("--version", action="version", version=f"llmhost {__version__}")
    parser.add_argument("--registry", metavar="PATH", help="the servers.json to use")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("add", help="register an LLM server (checked before it is saved)",
                       description="Register an OpenAI-compatible server. URL is the base URL a "
                       "client would use, usually ending in /v1. The server is probed with "
                       "GET URL/models unless --no-check is given.")
    p.add_argument("name", help="a unique name: 1-64 of A-Z a-z 0-9 . _ -")
    p.add_argument("url", nargs="?", help="base URL, e.g. http://127.0.0.1:8080/v1")
    p.add_argument("--model", action="append", metavar="ID",
                   help="a model id it serves (repeatable; default: all it lists)")
    p.add_argument("--alias", metavar="PUBLIC", help="public name for the single --model")
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable with its key")
    p.add_argument("--api-key", metavar="KEY", help="literal key (file becomes mode 0600)")
    p.add_argument("--timeout", type=float, metavar="S",
                   help=f"seconds to first byte and between bytes (default {UPSTREAM_TIMEOUT:g})")
    p.add_argument("--max-concurrency", type=int, metavar="N",
                   help="requests it takes at once (e.g. llama.cpp --parallel)")
    p.add_argument("--priority", type=int, metavar="N",
                   help="lower is tried first among servers of one model (default 0)")
    p.add_argument("--mcp", action="append", metavar="NAME",
                   help="give its models this MCP server's tools (repeatable)")
    p.add_argument("--vision", action="store_true", default=None,
                   help="its models read images: MCP tool images are given to them")
    p.add_argument("--no-stream-usage", dest="stream_usage", action="store_false",
                   default=None, help="do not ask it for a stream's usage (stream_options."
                   "include_usage), for a server that refuses the field")
    p.add_argument("--native", metavar="API[,API]",
                   help="relay these APIs (responses, messages) to the server's own endpoint "
                   "when llmhost runs no tools, instead of translating them onto its chat "
                   "completions: only for a server that gets them right (OpenAI, Anthropic)")
    p.add_argument("--no-check", action="store_true", help="save without probing the server")
    managed = p.add_argument_group("servers llmhost starts itself (instead of URL)")
    managed.add_argument("--command", metavar="'CMD ... ${PORT}'",
                         help="command line; ${PORT}, ${MODEL}, ${env.VAR} are expanded")
    managed.add_argument("--ttl", type=float, metavar="S",
                         help=f"stop after S idle seconds (default {MANAGED_TTL:g}; 0 = never)")
    managed.add_argument("--ready-path", metavar="PATH",
                         help="answers 200 when ready (default /health)")
    managed.add_argument("--start-timeout", type=float, metavar="S",
                         help=f"seconds to become ready (default {MANAGED_START_TIMEOUT:g})")
    managed.add_argument("--env", action="append", metavar="K=V", help="extra environment")
    managed.add_argument("--cwd", metavar="DIR", help="working folder")
    managed.add_argument("--group", metavar="NAME",
                         help="--max-running counts servers per group")
    managed.add_argument("--check", action="store_true",
                         help="start it once, list its models, stop it")
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("remove", help="unregister a server")
    p.add_argument("name")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("list", help="list registered servers")
    p.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="show one server's entry")
    p.add_argument("name")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=4000, help="port (default 4000)")
    p.add_argument("--api-key", action="append", metavar="KEY",
                   help="key clients must send (repeatable; also $LLMHOST_API_KEY, comma-separated)")
    p.add_argument("--max-concurrency", type=int, default=MAX_CONCURRENCY, metavar="N",
                   help=f"requests proxied at once (default {MAX_CONCURRENCY})")
    p.add_argument("--queue-size", type=int, default=QUEUE_SIZE, metavar="N",
                   help=f"requests that may wait for a slot before 429 (default {QUEUE_SIZE})")
    p.add_argument("--queue-timeout", type=float, default=QUEUE_TIMEOUT, metavar="S",
                   help=f"seconds a request may wait for a slot (default {QUEUE_TIMEOUT:g})")
    p.add_argument("--shutdown-timeout", type=float, default=SHUTDOWN_TIMEOUT, metavar="S",
                   help=f"seconds in-flight requests get after SIGTERM (default "
                        f"{SHUTDOWN_TIMEOUT:g})")
    p.add_argument("--workers", default="1", metavar="N",
                   help="processes sharing the port (SO_REUSEPORT); 'auto' = one per CPU")
    p.add_argument("--no-auth", action="store_true",
                   help="allow a non-loopback --host without an API key")
    p.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="a Host name accepted besides loopback ones (DNS-rebinding guard)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="a browser origin that may use llmhost, with CORS (repeatable, or "
                        "'*'); pages of other origins get 403")
    p.add_argument("--max-running", type=int, metavar="N",
                   help="managed servers running at once (per --group); idle ones make room")
    p.add_argument("--mcp-max-rounds", type=int, default=MCP_MAX_ROUNDS, metavar="N",
                   help=f"model/tool rounds per request (default {MCP_MAX_ROUNDS})")
    p.add_argument("--mcp-allow-url", action="append", metavar="PREFIX",
                   help="allow requests to name MCP servers by a server_url with this prefix")
    p.add_argument("--mcp-expose", metavar="NAME,...",
                   help="the registered MCP servers /mcp serves to MCP clients (default: all "
                   "but those marked private)")
    p.add_argument("--root", action="append", metavar="PATH",
                   help="a folder offered to MCP servers as a root (default: none)")
    p.add_argument("--no-store", action="store_true",
                   help="keep no /v1/responses answers (else they are kept 30 days in "
                        "REGISTRY.responses.sqlite, for previous_response_id and GET)")
    p.add_argument("--no-discover", action="store_true",
                   help="with an empty registry, do not look for local servers")
    p.add_argument("--discover-ports", metavar="N,N",
                   help="with an empty registry, look on these ports (default: those of LM "
                        "Studio, Ollama, llama.cpp, vLLM...)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--no-access-log", action="store_true", help="no line per request")
    p.add_argument("--api-keys-file", metavar="FILE",
                   help="API keys with labels, one 'LABEL KEY' per line (mode 0600); the label "
                        "is in the JSON access log")
    p.add_argument("--access-log-format", choices=["text", "json"], default="text",
                   help="json: each access line one JSON object (id, route, model, server, "
                        "status, duration_ms, prompt_tokens, completion_tokens)")
    p.add_argument("--metrics-public", action="store_true",
                   help="serve GET /metrics (Prometheus) without the API key; the rest keeps it")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="load-test any OpenAI-compatible endpoint",
                       description="Measure req/s, latency, time to first token, inter-token "
                       "latency and output tokens/s of URL (a base URL such as "
                       "http://127.0.0.1:4000/v1). Run it against a model directly and through "
                       "llmhost to see the gateway's cost on your hardware. Each prompt starts "
                       "with its request's number, so no prompt cache answers it. Exit 0 when "
                       "every request succeeded, 1 when any failed, 130 after Ctrl-C (which "
                       "prints what finished).")
    p.add_argument("url")
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", "-c", type=int, default=1, metavar="N",
                   help="clients sending at once (default 1)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--requests", "-n", type=int, metavar="N", help="total (default 100)")
    group.add_argument("--duration", "-d", type=float, metavar="S",
                       help="run for S seconds; requests still open then are cut, not counted")
    p.add_argument("--stream", action="store_true", help="stream (measures TTFT and ITL)")
    p.add_argument("--ramp", type=float, default=0.0, metavar="S",
                   help="spread the clients' first requests over S seconds (default 0)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--prompt", metavar="TEXT")
    group.add_argument("--prompt-tokens", type=int, default=16, metavar="N",
                       help="a prompt of about N tokens (default 16)")
    p.add_argument("--max-tokens", type=int, default=64, metavar="N", help="(default 64)")
    p.add_argument("--api-key", metavar="KEY")
    p.add_argument("--api-key-env", metavar="VAR", help="read the key from $VAR")
    p.add_argument("--timeout", type=float, default=UPSTREAM_TIMEOUT, metavar="S",
                   help=f"to first byte and between bytes (default {UPSTREAM_TIMEOUT:g})")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_bench)

    add_mcp_parsers(sub)

    for name, func, help_text in (
            ("ps", cmd_ps, "managed servers of a running serve (pid, port, state, idle)"),
            ("load", cmd_load, "start a managed server now, through the running serve"),
            ("unload", cmd_load, "stop a managed server now, through the running serve")):
        p = sub.add_parser(name, help=help_text)
        if name != "ps":
            p.add_argument("name")
        p.add_argument("--url", help=SERVE_URL_HELP)
        p.add_argument("--api-key", metavar="KEY", help="its API key (default $LLMHOST_API_KEY)")
        p.set_defaults(func=func, action=name)

    p = sub.add_parser("chat", help="talk to a model from the console (through the "
                       "Responses API)",
                       description="A conversation with MODEL through the running serve of the "
                       "registry (or --url), else through llmhost started in this process. Not "
                       "on a console (a pipe): the message is read from standard input and only "
                       "the answer is printed. /help lists the commands.")
    p.add_argument("model", nargs="?", help="the model (default: pick one from the list)")
    p.add_argument("--url", help=SERVE_URL_HELP)
    p.add_argument("--api-key-env", metavar="VAR",
                   help="variable holding serve's API key (default $LLMHOST_API_KEY)")
    p.add_argument("--system", metavar="TEXT", help="the system prompt")
    p.add_argument("--image", action="append", metavar="PATH",
                   help="attach an image to the first message (repeatable)")
    p.add_argument("--load", metavar="FILE", help="go on with a conversation /save wrote")
    p.add_argument("--no-mcp", action="store_true",
                   help="the model calls no tools (its MCP servers' are not run)")
    p.add_argument("--json", action="store_true", help="print each final response object")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("logs", help="output of a managed server (kept beside the registry)")
    p.add_argument("name")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("-n", "--lines", type=int, default=50)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("discover", help="find LM Studio, Ollama, llama.cpp, vLLM... on this "
                       "machine's usual ports")
    p.add_argument("--add", action="store_true", help="register what answers")
    p.add_argument("--ports", metavar="N,N", help="probe these ports instead")
    p.set_defaults(func=cmd_discover)

    p = sub.add_parser("status", help="health and load of a running serve")
    p.add_argument("--url", help=SERVE_URL_HELP)
    p.add_argument("--api-key", metavar="KEY", help="its API key (default $LLMHOST_API_KEY)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv=None, environ=None):
    environ = os.environ if environ is None else environ
    argv = list(sys.argv[1:] if argv is None else argv)
    command = []
    if "--" in argv and "mcp" in argv[:argv.index("--")]:  # mcp ... -- COMMAND ARGS
        command = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    args = build_parser().parse_args(argv)
    args.cmd = command
    try:
        return args.func(args, environ)
    except (CLIError, RegistryError) as exc:  # (a URL in one never shows its password)
        print(f"llmhost: error: {hide_password(str(exc))}", file=sys.stderr)
        return 1
    except OSError as exc:  # a registry folder that is missing or not writable, a full disk
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"llmhost: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
