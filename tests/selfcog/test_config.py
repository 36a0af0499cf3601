"""selfcog/config.py: settings from the environment; a value that can't be used names its variable."""

from __future__ import annotations

import pytest

from bot.errors import UserError
from selfcog.config import Settings


def test_defaults_and_chat_sampling_from_the_environment():
    default = Settings.from_env({})
    assert (default.engine, default.chat_temperature, default.chat_top_p, default.chat_repetition_penalty) == \
        ("local", 0.7, 0.9, 1.15)
    tuned = Settings.from_env({"SELFCOG_ENGINE": "vllm", "SELFCOG_CHAT_TEMPERATURE": "0", "SELFCOG_CHAT_TOP_P": "1",
                               "SELFCOG_CHAT_REPETITION_PENALTY": "1.3", "SELFCOG_ADMIN_IDS": " 12, 34 ",
                               "SELFCOG_PORT": "8080"})
    assert (tuned.engine, tuned.chat_temperature, tuned.chat_top_p, tuned.chat_repetition_penalty) == \
        ("vllm", 0.0, 1.0, 1.3)
    assert tuned.admin_ids == {12, 34} and tuned.port == 8080


@pytest.mark.parametrize("variable, value", [
    ("SELFCOG_PORT", "http"), ("SELFCOG_PORT", "70000"), ("SELFCOG_DB_TIMEOUT_S", "soon"),
    ("SELFCOG_DB_TIMEOUT_S", "nan"), ("SELFCOG_ADMIN_IDS", "12,bob"), ("SELFCOG_CHAT_TOP_P", "1.5"),
    ("SELFCOG_CHAT_REPETITION_PENALTY", "0.5"), ("SELFCOG_MAX_NEW_TOKENS", "0"),
    ("SELFCOG_TRAINER", "subprocess"), ("SELFCOG_TRAIN_WEIGHTS", "gpu"), ("SELFCOG_DTYPE", "fp8"),
    ("SELFCOG_PREPARE_AHEAD", "yes"), ("SELFCOG_EVAL_DTYPE", "int8"),
])
def test_unusable_values_name_the_variable(variable, value):
    with pytest.raises(UserError, match=f"^{variable} must be .*, not {value!r}$"):
        Settings.from_env({variable: value})


def test_where_training_runs_is_chosen_by_device_unless_asked():
    """SELFCOG_TRAINER: auto (default: in process), in-process or worker; SELFCOG_TRAIN_WEIGHTS: auto (default), serving or copy."""
    default = Settings.from_env({})
    assert (default.trainer, default.train_weights) == ("auto", "auto")
    asked = Settings.from_env({"SELFCOG_TRAINER": " Worker ", "SELFCOG_TRAIN_WEIGHTS": "SERVING"})
    assert (asked.trainer, asked.train_weights) == ("worker", "serving")
    assert Settings.from_env({"SELFCOG_TRAIN_WEIGHTS": "copy"}).train_weights == "copy"


@pytest.mark.parametrize("value, device, prepares", [
    (None, "cpu", False), (None, "cuda", True), ("on", "cpu", True), ("OFF", "cuda", False), ("auto", "cuda:1", True),
])
def test_the_job_runner_prepares_ahead_on_a_gpu_unless_told(value, device, prepares):
    """SELFCOG_PREPARE_AHEAD: auto (default) = on a GPU, where the first retrain's reference evaluations take
    seconds; on a CPU they are minutes of both cores, so only when asked."""
    from types import SimpleNamespace

    from selfcog.serve import job_settings

    settings = Settings.from_env({} if value is None else {"SELFCOG_PREPARE_AHEAD": value})
    assert job_settings(settings, SimpleNamespace(device=device)).prepare_ahead is prepares
