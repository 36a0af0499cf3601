"""A stand-in for vLLM's OpenAI-compatible server, for what this CPU cannot run: sleep mode needs a GPU.

Started the way selfcog starts vLLM (``<python> -m vllm.entrypoints.openai.api_server --host H --port P
...``, the python being a wrapper script around this file), it answers the endpoints selfcog uses and
records every call; ``GET /recorded`` returns them with its command line and environment.
"""

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ANSWER = ["Hello", " from", " the", " stand-in."]
calls: list[str] = []
sleeping = threading.Event()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/recorded":
            return self.send_json({"calls": calls, "argv": sys.argv[1:],
                                   "dev_mode": os.environ.get("VLLM_SERVER_DEV_MODE")})
        if self.path != "/health":
            calls.append(f"GET {self.path}")
        if self.path == "/health":
            self.send_json({})
        elif self.path == "/v1/models":
            self.send_json({"data": [{"id": "base", "parent": None, "max_model_len": 2048}]})
        else:
            self.send_json({"error": {"message": "not found"}}, 404)

    def do_POST(self):
        calls.append(f"POST {self.path}")
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.startswith("/sleep"):
            sleeping.set()
            self.send_json({"status": "sleeping"})
        elif self.path == "/wake_up":
            sleeping.clear()
            self.send_json({"status": "awake"})
        elif self.path == "/v1/chat/completions" and sleeping.is_set():
            self.send_json({"error": {"message": "the engine is sleeping"}}, 503)
        elif self.path == "/v1/chat/completions":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            events = [{"choices": [{"delta": {"content": piece}}]} for piece in ANSWER]
            events.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": len(ANSWER)}})
            for event in events:
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
        else:
            self.send_json({"status": "ok"})

    def send_json(self, body, status=200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    args = sys.argv[1:]
    host, port = args[args.index("--host") + 1], int(args[args.index("--port") + 1])
    ThreadingHTTPServer((host, port), Handler).serve_forever()
