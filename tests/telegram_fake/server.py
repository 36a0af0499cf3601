"""HTTP for the fake: the Bot API's URLs on 127.0.0.1, served from a background thread.

    server = ApiServer(api).start()
    f"http://127.0.0.1:{server.port}/bot{api.token}/getMe"   # POST or GET
    f"http://127.0.0.1:{server.port}/file/bot{api.token}/voice/file_1.oga"
    server.close()

Requests may be JSON, form-encoded (what PTB 22.8 sends: every value a string, objects as JSON
text) or multipart (what PTB sends when it uploads a file). A thread per connection, so a long
poll never holds up the bot's other calls.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, urlsplit

from .bot_api import ApiError, BotApi

__all__ = ["ApiServer", "decode_params"]

_API_PATH = re.compile(r"/bot(?P<token>[^/]+)/(?P<method>[A-Za-z]+)/?")
_FILE_PATH = re.compile(r"/file/bot(?P<token>[^/]+)/(?P<path>.+)")

# Form values arrive as text, so "123" could be text or a number. These stay text; any other
# value is read as JSON where it parses (numbers, booleans, objects), as Telegram reads them.
_TEXT_PARAMS = {
    "text", "caption", "parse_mode", "callback_query_id", "inline_message_id", "url", "action",
    "description", "short_description", "name", "language_code", "file_id", "emoji", "business_connection_id",
}  # fmt: skip


def decode_params(content_type: str, body: bytes, query: str = "") -> tuple[dict, dict[str, bytes]]:
    """The parameters of a request and its uploaded files; raises ValueError on a body it can't read."""
    params = {name: _form_value(name, value) for name, value in parse_qsl(query, keep_blank_values=True)}
    files: dict[str, bytes] = {}
    mime = content_type.split(";", 1)[0].strip().lower()
    if not body:
        pass
    elif mime == "application/json":
        decoded = json.loads(body)
        if not isinstance(decoded, dict):
            raise ValueError("the JSON body is not an object")
        params.update(decoded)
    elif mime == "application/x-www-form-urlencoded":
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
        params.update({name: _form_value(name, value) for name, value in pairs})
    elif mime == "multipart/form-data":
        fields, files = _multipart(content_type, body)
        params.update(fields)
    else:
        raise ValueError(f"unsupported Content-Type {mime!r}")
    return params, files


def _form_value(name: str, value: str):
    if name in _TEXT_PARAMS:
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value  # "@channel", plain words


def _multipart(content_type: str, body: bytes) -> tuple[dict, dict[str, bytes]]:
    """Splits multipart/form-data with the standard library's MIME parser (cgi is gone in 3.13)."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields: dict = {}
    files: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            files[name] = data
        else:
            fields[name] = _form_value(name, data.decode("utf-8"))
    return fields, files


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as PTB's httpx pool expects
    disable_nagle_algorithm = True  # headers and body go out as two writes; don't hold the second back
    server: _Server

    def do_POST(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    def log_message(self, format: str, *args) -> None:
        pass  # tg.calls is the log; a line per long poll on stderr would bury test output

    def _serve(self) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)  # PTB quotes download URLs: the token's ":" arrives as "%3A"
        body = self._read_body()
        api = self.server.api
        if match := _FILE_PATH.fullmatch(path):
            data = api.file_data(match["path"]) if match["token"] == api.token else None
            if data is None:
                self._send(404, b"Not Found", "text/plain")
            else:
                self._send(200, data, "application/octet-stream")
            return
        match = _API_PATH.fullmatch(path)
        if match is None:
            status, payload = 404, ApiError(404, "Not Found").payload()
        else:
            try:
                params, files = decode_params(self.headers.get("Content-Type", ""), body, url.query)
            except (ValueError, UnicodeDecodeError) as error:
                status, payload = 400, ApiError(400, f"Bad Request: can't read the request: {error}").payload()
            else:
                status, payload = api.handle(match["token"], match["method"], params, files)
        self.close_connection = api.closed  # kept-alive connections outlive the listening socket
        self._send(status, json.dumps(payload, ensure_ascii=False).encode(), "application/json")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
            self.rfile.readline()  # the empty line after the last one
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a connection PTB keeps alive must not keep the test process alive

    def __init__(self, api: BotApi) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)  # port 0: the OS picks a free one
        self.api = api

    def handle_error(self, request, client_address) -> None:
        # A client that hung up mid-answer (a cancelled long poll) is normal here, not an error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class ApiServer:
    """Serves a BotApi over HTTP on 127.0.0.1 from a background thread."""

    def __init__(self, api: BotApi) -> None:
        self.api = api
        self._httpd = _Server(api)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},  # how soon close() is noticed
            name=f"FakeTelegram:{self.port}",
            daemon=True,
        )

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def start(self) -> ApiServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.api.close()  # long polls answer now instead of at their timeout
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
