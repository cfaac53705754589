"""A `custom_auth` hook for test proxies: hands out per-key limits from a JSON file, no database.

The file named by `TL_TEST_KEYS` maps each raw `sk-` key to the `UserAPIKeyAuth` fields it gets,
for example `{"sk-a": {"rpm_limit": 3, "user_id": "u-1", "team_id": "t-1"}}`. The file is read
again when it changes, so a test can add keys to a running proxy. An unknown key is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request
from litellm.proxy._types import UserAPIKeyAuth

_cache: dict[str, Any] = {"mtime": None, "keys": {}}


def _keys() -> dict[str, dict[str, Any]]:
    path = Path(os.environ["TL_TEST_KEYS"])
    mtime = path.stat().st_mtime_ns
    if _cache["mtime"] != mtime:
        _cache["keys"] = json.loads(path.read_text())
        _cache["mtime"] = mtime
    return _cache["keys"]


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    """Answer with the limits the keys file gives `api_key`, or 401."""
    raw = api_key.removeprefix("Bearer ").strip()
    fields = _keys().get(raw)
    if fields is None:
        raise HTTPException(status_code=401, detail="unknown test key")
    return UserAPIKeyAuth(api_key=raw, **fields)
