"""The adapter counts short prompts' tokens on the event loop and long ones in a thread."""

from __future__ import annotations

import threading

import pytest
from litellm.proxy.hooks import parallel_request_limiter_v3 as v3

from tiered_limiter import litellm as adapter


def _where(**_: object) -> int:
    return threading.get_ident()


@pytest.mark.parametrize(
    ("data", "inline"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, True),
        ({"messages": [{"role": "user", "content": "x" * 5000}]}, False),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, False),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": []}, False),
        (None, False),
    ],
)
async def test_short_prompts_are_counted_inline(
    monkeypatch: pytest.MonkeyPatch, data: object, inline: bool
) -> None:
    monkeypatch.setattr(v3, "offload_token_count", v3.offload_token_count)
    adapter._count_short_prompts_inline()
    adapter._count_short_prompts_inline()  # a second install wraps nothing twice
    counted_on = await v3.offload_token_count(_where)(data=data)
    assert (counted_on == threading.get_ident()) is inline
