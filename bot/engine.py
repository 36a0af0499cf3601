"""Moved to bot/engines; this re-export goes once every import is moved."""
from bot.engines import *  # noqa: F401,F403
from bot.engines.local import LocalEngine  # noqa: F401
