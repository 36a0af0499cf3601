"""store/: the only place that speaks SQL. Everything else calls these methods."""

from store.db import Store, StoreError, utcnow
from store.identity import DEFAULT_PROFILE, Profile

__all__ = ["Store", "StoreError", "utcnow", "Profile", "DEFAULT_PROFILE"]
