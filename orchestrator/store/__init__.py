"""The SQL experiment store and queue."""

from orchestrator.store.store import DEFAULT_URL, STORE_ENV, Claim, Fenced, Store, mask_url

__all__ = ["DEFAULT_URL", "STORE_ENV", "Claim", "Fenced", "Store", "mask_url"]
