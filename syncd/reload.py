"""What a reload (SIGHUP) changes: the config to run, and which syncs and sources differ.

Applied live: syncs added, removed or changed (mapping, schedule, table, anything: a
changed sync gets a new runner), sources (syncs using a changed source are rebuilt), the
`[api]` batching, concurrency, retry and rate settings, `[log]` and `drain_timeout`.
Not applied: `[state]`, `[metrics] listen` and `[api]` url / token / token_file /
timeout_s (`RESTART_KEYS`): those hold connections, a listening socket or secrets
(systemd credentials are fixed for the life of the process anyway). The daemon logs
`reload_needs_restart` naming them and keeps running on their old values.

This module only compares configs; the daemon builds the new runners and swaps them in.
"""

from __future__ import annotations

from dataclasses import dataclass

from syncd.config import Config

__all__ = ["RESTART_KEYS", "ReloadPlan", "effective_config", "plan_reload"]

_API_RESTART_FIELDS = ("url", "token", "token_file", "timeout_s")
RESTART_KEYS = ("state", "metrics.listen", *(f"api.{name}" for name in _API_RESTART_FIELDS))


def effective_config(running: Config, loaded: Config) -> tuple[Config, list[str]]:
    """`loaded` with the restart-only settings kept at their running values, and the
    keys of those that differ (the operator must restart to apply them)."""
    needs_restart = []
    if running.state != loaded.state:
        needs_restart.append("state")
    if running.metrics.listen != loaded.metrics.listen:
        needs_restart.append("metrics.listen")
    kept = {}
    for name in _API_RESTART_FIELDS:
        if getattr(running.api, name) != getattr(loaded.api, name):
            needs_restart.append(f"api.{name}")
        kept[name] = getattr(running.api, name)
    api = loaded.api.model_copy(update=kept)
    config = loaded.model_copy(update={"state": running.state, "metrics": running.metrics, "api": api})
    return config, needs_restart


@dataclass(frozen=True)
class ReloadPlan:
    """Sync and source names by what a reload does to them."""

    added: list[str]
    removed: list[str]
    changed: list[str]  # a new runner, swapped in between cycles
    unchanged: list[str]
    changed_sources: set[str]  # rebuilt (new or different settings)

    def summary(self) -> dict[str, list[str]]:
        """The `config_reloaded` log line's fields."""
        return {"added": self.added, "removed": self.removed, "changed": self.changed, "unchanged": self.unchanged}


def plan_reload(running: Config, config: Config) -> ReloadPlan:
    """Compare the running config with the effective new one: a sync is changed when
    its own settings, its source's or the `[api]` settings its runner holds differ."""
    changed_sources = {name for name, source in config.sources.items() if running.sources.get(name) != source}
    current = {sync.name for sync in running.syncs}
    added, changed, unchanged = [], [], []
    for sync in config.syncs:
        if sync.name not in current:
            added.append(sync.name)
        elif sync != running.sync(sync.name) or sync.source in changed_sources or config.api != running.api:
            changed.append(sync.name)
        else:
            unchanged.append(sync.name)
    removed = sorted(current - {sync.name for sync in config.syncs})
    return ReloadPlan(added, removed, changed, unchanged, changed_sources)
