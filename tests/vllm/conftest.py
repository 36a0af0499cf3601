"""One real vLLM server (CPU build, .venv-vllm from `make vllm`) for the whole session, and an engine on it.

The server takes about a minute to start on two cores; every test shares it (the crash test restarts it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import ARTIFACTS, FollowedAdapter

VLLM_PYTHON = Path(os.environ.get("SELFCOG_VLLM_PYTHON") or Path(__file__).resolve().parents[2] / ".venv-vllm/bin/python")


@pytest.fixture(scope="session")
def vllm_server(embedded_model):
    from bot.engines.vllm_server import VLLMServer

    if not VLLM_PYTHON.exists():
        pytest.skip(f"vLLM is not installed ({VLLM_PYTHON} is missing): run `make vllm`")
    server = VLLMServer(embedded_model.path, python=str(VLLM_PYTHON), log_path=ARTIFACTS / "vllm" / "vllm.log",
                        max_num_seqs=16)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def session_vllm_engine(vllm_server, embedded_model):
    """The engine over the session's server; poll_s=0: every request looks at the store first."""
    from bot.engines.openai import OpenAIEngine

    follow = FollowedAdapter()
    engine = OpenAIEngine(embedded_model, vllm_server.base_url, served_model="base", active_adapter=follow,
                          server=vllm_server, max_new_tokens=24, poll_s=0)
    engine.follow = follow
    yield engine
    engine.close()


@pytest.fixture
def vllm_engine(session_vllm_engine, store):
    """The session's vLLM engine serving this test's store's live adapter, as `selfcog serve` would."""
    session_vllm_engine.follow.source = store.adapters.active
    yield session_vllm_engine
    session_vllm_engine.follow.source = lambda: None
    session_vllm_engine.refresh_adapter()


@pytest.fixture
def standin_python(tmp_path) -> str:
    """A 'python' whose `-m vllm.entrypoints.openai.api_server ARGS` runs tests/vllm/standin_server.py ARGS."""
    import sys

    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\nshift 2\nexec {sys.executable} {Path(__file__).parent / 'standin_server.py'} \"$@\"\n")
    script.chmod(0o755)
    return str(script)
