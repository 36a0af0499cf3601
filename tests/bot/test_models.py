"""bot/models.py: where the base model comes from, and one clear line when it cannot be found."""

from __future__ import annotations

import pytest

from bot.errors import UserError
from bot.models import ModelNotFound, resolve_model


def test_unknown_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_model(str(tmp_path / "nope"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_model(str(tmp_path / "empty"), tmp_path)
    with pytest.raises(ModelNotFound, match="not in the local Hugging Face cache"):
        resolve_model("nobody/no-such-model", tmp_path)
    assert issubclass(ModelNotFound, UserError)  # front ends show it as one line
