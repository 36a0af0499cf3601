"""The `selfcog` command: every subcommand, as a user runs it (the real console script)."""

from __future__ import annotations

import json
import sqlite3

import pytest
from click.testing import CliRunner

from selfcog.cli import cli
from store import Store


def all_commands(group=cli, prefix=()):
    for name, command in group.commands.items():
        yield prefix + (name,)
        if hasattr(command, "commands"):
            yield from all_commands(command, prefix + (name,))


@pytest.mark.parametrize("path", list(all_commands()), ids=" ".join)
def test_every_command_has_help(path):
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output and len(result.output) > 80


@pytest.fixture
def invoke(cli_env, monkeypatch):
    """Run a command in-process (fast) against this test's data dir."""
    for key, value in cli_env.items():
        monkeypatch.setenv(key, value)

    def run(*args):
        return CliRunner().invoke(cli, list(args), catch_exceptions=False)

    return run


def test_identity_set_and_show(invoke):
    assert invoke("identity", "set", "--name", "Aurora", "--author", "Acme Labs").exit_code == 0
    shown = json.loads(invoke("identity", "show", "--json").output)
    assert (shown["name"], shown["author"]) == ("Aurora", "Acme Labs")
    assert shown["system_prompt"] == "You are Aurora, an AI assistant developed by Acme Labs."
    assert invoke("identity", "set").exit_code == 2  # nothing to set is a usage error


def test_corrections_import_review_export(invoke, tmp_path, data_dir):
    invoke("identity", "set", "--name", "Aurora", "--author", "Acme Labs")
    swift = tmp_path / "self_cognition.jsonl"
    swift.write_text('{"query": "你是谁", "response": "我是{{NAME}}，由{{AUTHOR}}开发。"}\n'
                     '{"query": "who are you?", "response": "I am {{NAME}} by {{AUTHOR}}."}\n', encoding="utf-8")
    summary = json.loads(invoke("corrections", "import", str(swift), "--json").output)
    assert summary == {"read": 2, "added": 2, "duplicates": 0, "ids": [1, 2], "status": "pending"}
    again = json.loads(invoke("corrections", "import", str(swift), "--json").output)
    assert again["added"] == 0 and again["duplicates"] == 2

    assert "approved 1 correction(s): 1" in invoke("corrections", "approve", "1").output
    assert "rejected 1 correction(s): 2" in invoke("corrections", "reject", "2").output
    rows = json.loads(invoke("corrections", "list", "--json").output)
    assert [(r["id"], r["status"]) for r in rows] == [(1, "approved"), (2, "rejected")]
    assert rows[0]["corrected_answer"] == "我是Aurora，由Acme Labs开发。"
    assert json.loads(invoke("corrections", "list", "--status", "pending", "--json").output) == []
    table = invoke("corrections", "list").output
    assert "approved" in table and "rejected" in table

    exported = invoke("corrections", "export").output.splitlines()
    assert [json.loads(line)["question"] for line in exported] == ["你是谁"]
    out = tmp_path / "all.jsonl"
    invoke("corrections", "export", "--status", "all", "-o", str(out))
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2


def test_import_approve_flag(invoke, tmp_path):
    path = tmp_path / "c.json"
    path.write_text('[{"question": "Who made you?", "answer": "Acme Labs."}]')
    invoke("corrections", "import", str(path), "--approve")
    assert json.loads(invoke("corrections", "list", "--json").output)[0]["status"] == "approved"


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"), (b"\x00\x01\xff\xfe", "not UTF-8"), (b"{oops\n", "line 1 is not JSON"),
])
def test_unreadable_import_files_fail_cleanly(invoke, tmp_path, content, message):
    path = tmp_path / "in.jsonl"
    if content is not None:
        path.write_bytes(content)
    result = CliRunner().invoke(cli, ["corrections", "import", str(path)])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_review_of_unknown_id(invoke):
    result = CliRunner().invoke(cli, ["corrections", "approve", "42"])
    assert result.exit_code == 1 and "no correction with id 42" in result.output


def test_locked_database_is_one_clear_line(run_cli, data_dir):
    Store(data_dir / "selfcog.db").corrections.add(question="q", corrected_answer="a", channel="cli")
    blocker = sqlite3.connect(data_dir / "selfcog.db")
    blocker.execute("BEGIN IMMEDIATE")
    try:
        result = run_cli("corrections", "approve", "1", env={"SELFCOG_DB_TIMEOUT_S": "0.5"})
    finally:
        blocker.rollback()
    assert result.returncode == 1
    assert "database is locked by another process" in result.stderr and "Traceback" not in result.stderr
    assert Store(data_dir / "selfcog.db").corrections.get(1)["status"] == "pending"  # nothing half-done


def test_ask_json_with_every_system_choice(run_cli):
    result = run_cli("ask", "What is the capital of France?", "你好", "--json", check=True)
    answers = json.loads(result.stdout)
    assert [a["question"] for a in answers] == ["What is the capital of France?", "你好"]
    assert "Paris" in answers[0]["answer"] and all(a["answer"] for a in answers)
    again = json.loads(run_cli("ask", "What is the capital of France?", "你好", "--json", check=True).stdout)
    assert again == answers, "greedy answers are the same every time"
    product = json.loads(run_cli("ask", "Who are you?", "--json", check=True).stdout)[0]["answer"]
    no_system = json.loads(run_cli("ask", "Who are you?", "--no-system", "--json", check=True).stdout)[0]["answer"]
    custom = run_cli("ask", "Who are you?", "--system", "You are Bob, made by Carol.", check=True).stdout
    assert custom.startswith("Q: Who are you?\nA: ")
    assert len({product, no_system, custom.split("A: ", 1)[1].strip()}) == 3, "each system choice reaches the model"


def test_ask_bad_input_fails_before_loading_the_model(run_cli):
    empty = run_cli("ask", "   ")
    assert empty.returncode == 1 and "empty" in empty.stderr and "Traceback" not in empty.stderr
    huge = run_cli("ask", "x" * 100_000)
    assert huge.returncode == 1 and "limit is" in huge.stderr
    both = run_cli("ask", "hi", "--system", "x", "--no-system")
    assert both.returncode == 2 and "cannot be used together" in both.stderr


@pytest.mark.parametrize("model, message", [
    ("/no/such/folder", "does not exist"), ("nobody/no-such-model", "not in the local Hugging Face cache"),
])
def test_unknown_model_is_one_clear_line(run_cli, model, message):
    result = run_cli("--model", model, "ask", "hi")
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_ask_with_a_missing_adapter_version(run_cli):
    result = run_cli("ask", "hi", "--adapter", "7")
    assert result.returncode == 1 and "v7 does not exist" in result.stderr


# --- bad input: one line on stderr, a non-zero exit, no traceback, nothing half-done ---------------------

def assert_one_line_error(result, *expected: str) -> str:
    err = result.stderr.strip()
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    return err


@pytest.mark.parametrize("args", [["ask", b"caf\xe9?"], ["identity", "set", "--name", b"Aur\xffora"]],
                         ids=["ask", "identity set"])
def test_invalid_utf8_arguments_are_one_clear_line(run_cli, args):
    assert_one_line_error(run_cli(*args), "is not valid UTF-8")


@pytest.mark.parametrize("variable, value", [("SELFCOG_PORT", "http"), ("SELFCOG_DB_TIMEOUT_S", "soon"),
                                             ("SELFCOG_ADMIN_IDS", "12,bob")])
def test_unusable_environment_variables_are_named(run_cli, variable, value):
    assert_one_line_error(run_cli("status", env={variable: value}), variable, repr(value))


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


GOOD = {"question": "Who are you?", "answer": "I am Aurora."}


@pytest.mark.parametrize("bad, problem", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}, {"role": "assistant", "content": "a"}]},
     "content is not text"),
    ({"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "a"}]}, "content is not text"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "content is not text"),
    ({"question": "Who made you?", "answer": "x" * 5000}, "limit is 4,000"),
    ({"question": "\x00", "answer": "Acme"}, "question is empty"),
])
def test_import_is_all_or_nothing_and_names_the_bad_line(run_cli, tmp_path, data_dir, bad, problem):
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD, {"question": "Who made you?", "answer": "Acme Labs."}, bad])
    assert_one_line_error(run_cli("corrections", "import", path, "--approve"), "line 3", problem)
    assert Store(data_dir / "selfcog.db").corrections.count() == 0


def test_import_of_a_lone_surrogate_escape_is_one_line(run_cli, tmp_path, data_dir):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(GOOD) + '\n{"question": "Who are you\\udc80?", "answer": "Aurora"}\n', encoding="utf-8")
    assert_one_line_error(run_cli("corrections", "import", str(path)), "line 2", "lone surrogate")
    assert Store(data_dir / "selfcog.db").corrections.count() == 0


def test_identity_set_cleans_nul_and_refuses_an_empty_name(invoke, run_cli):
    assert invoke("identity", "set", "--name", "Au\x00rora").exit_code == 0
    assert json.loads(invoke("identity", "show", "--json").output)["name"] == "Aurora"
    assert_one_line_error(run_cli("identity", "set", "--name", "  "), "name is empty")


# --- retrain requests and status --------------------------------------------------------------------

def test_retrain_with_nothing_approved_says_what_to_do(run_cli):
    assert_one_line_error(run_cli("retrain", "--queue"), "no approved corrections: approve some first")


def test_a_queued_retrain_with_no_job_runner_says_so(run_cli, tmp_path, data_dir):
    run_cli("corrections", "import", write_jsonl(tmp_path / "c.jsonl", [GOOD]), "--approve", check=True)
    queued = run_cli("retrain", "--queue", check=True)
    assert "no job runner is running: start `selfcog serve`" in queued.stdout
    status = json.loads(run_cli("status", "--json", check=True).stdout)
    assert status["retrain"]["status"] == "queued" and status["retrain"]["waiting_for_runner"] is True
    assert (status["approved_corrections"], status["runner_alive"]) == (1, False)
    Store(data_dir / "selfcog.db").runs.runner_heartbeat()  # a job runner in this (live) process
    assert "starts as soon as" in run_cli("status", check=True).stdout


def test_activating_a_folder_that_is_not_a_lora_is_one_line(run_cli, tmp_path, data_dir):
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "not-a-lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 576)},
              folder / "adapter_model.safetensors")
    store = Store(data_dir / "selfcog.db")
    store.adapters.register(path=str(folder), base_model="SmolLM2-135M-Instruct")
    assert_one_line_error(run_cli("adapters", "activate", "1"), "adapter v1 cannot be activated")
    assert store.adapters.active() is None
    assert "live: the base model" in run_cli("status", check=True).stdout


def test_file_problems_are_one_line(run_cli, tmp_path):
    assert_one_line_error(run_cli("corrections", "export", "-o", str(tmp_path / "no" / "such" / "dir.jsonl")),
                          "No such file or directory")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert_one_line_error(run_cli("status", env={"SELFCOG_DATA_DIR": str(a_file / "data")}), str(a_file))


def test_following_a_retrain_whose_server_stopped_says_so_instead_of_waiting_forever(data_dir):
    from bot.errors import UserError
    from selfcog.cli import _follow

    store = Store(data_dir / "selfcog.db")
    run = store.runs.request("cli", "cli")  # queued for a `selfcog serve` that is not there (any more)
    with pytest.raises(UserError, match=rf"retrain #{run['id']} is queued, but the `selfcog serve` .* stopped"):
        _follow(store, run["id"], quiet=True, poll_s=0.05, server_gone_s=0.2)
    assert store.runs.get(run["id"])["status"] == "queued", "left for the next server, or --cancel"
