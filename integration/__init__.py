"""A real fleet on one machine: LiteLLM proxies behind nginx on one Redis, and load to drive it.

`integration.fleet` starts and stops the fleet, `integration.load` sends load through it and
reads back what was admitted; `docs/fleet.md` shows how to run both.
"""
