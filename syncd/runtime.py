"""A loaded config turned into live objects, once: state store, sources, API client, runners.

The CLI commands and the daemon all start from a `Runtime`, so there is exactly one place
where config becomes connections, and one place that closes them. Commands that need only
a part (`status`, `check`, `preview`, a reload's changed sources) take it from the
functions below, which `Runtime.open` uses too: the state database always gets its lease's
session bounds, the API client always tells the log redactor the key it reads.
(The offload child is the one exception: it is handed its source's config by the parent,
and importing this module there would make an import cycle through the cycle.)
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from syncd.config import Config, SecretFileError, SyncConfig, read_secret_file
from syncd.logs import register_secret
from syncd.source import Source
from syncd.state import StateStore

# The cycle, the API client and the metrics are imported where they are built: `status`
# and `check` take only the state and sources from here, without httpx or prometheus.
if TYPE_CHECKING:
    from syncd.cycle import CycleReport, SyncRunner
    from syncd.delivery import ApiClient, RateLimiter
    from syncd.metrics import Metrics

__all__ = ["Runtime", "open_api", "open_source", "open_state"]


@dataclass
class Runtime:
    config: Config
    state: StateStore
    client: ApiClient
    metrics: Metrics
    sources: dict[str, Source] = field(default_factory=dict)
    runners: dict[str, SyncRunner] = field(default_factory=dict)

    @classmethod
    def open(
        cls,
        config: Config,
        *,
        metrics: Metrics | None = None,
        limiter: RateLimiter | None = None,
        migrate: bool = True,
        should_stop: Callable[[], bool] = lambda: False,
        on_progress: Callable[[CycleReport], None] | None = None,
        migrating: Callable[[], AbstractContextManager[object]] = nullcontext,
    ) -> Runtime:
        from syncd.metrics import Metrics

        _register_secrets(config)
        state = open_state(config)
        if migrate:
            state.migrate(migrating)  # `migrating` wraps a migration that really runs
        client = open_api(config, limiter or _rate_limiter(config, state))
        runtime = cls(config=config, state=state, client=client, metrics=metrics or Metrics())
        runtime.sources = {name: open_source(config, name) for name in config.sources}
        for sync in config.syncs:
            runtime.runners[sync.name] = runtime.runner(sync, should_stop=should_stop, on_progress=on_progress)
        if migrate:
            state.ensure_syncs(runtime.runners)
            runtime.metrics.restore(state.status(), config.syncs)  # every sync's series before its first cycle
        return runtime

    def runner(
        self,
        sync: SyncConfig,
        *,
        should_stop: Callable[[], bool] = lambda: False,
        on_progress: Callable[[CycleReport], None] | None = None,
    ) -> SyncRunner:
        from syncd.cycle import SyncRunner

        return SyncRunner(
            sync,
            reader=self.sources[sync.source].reader(sync),
            state=self.state,
            client=self.client,
            api=self.config.api,
            metrics=self.metrics,
            lease=self.config.state.lease,
            should_stop=should_stop,
            on_progress=on_progress,
        )

    def warm_up(self) -> None:
        """Connect to every source and reflect every table now, then freeze the start-up heap.

        `gc.freeze()` moves the objects of start-up (modules, reflected tables, compiled
        mappings) out of the collector's sight, so a full collection during a backfill
        scans only what the backfill allocates.
        """
        for runner in self.runners.values():
            runner.warm_up()
        gc.collect()
        gc.freeze()

    def close(self) -> None:
        for runner in self.runners.values():
            self.state.release_lease(runner.sync.name)
        self.client.close()
        for source in self.sources.values():
            source.dispose()
        self.state.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_state(config: Config) -> StateStore:
    """The state database as configured, neither created nor migrated until used."""
    return StateStore(config.state.url, lease=config.state.lease)


def open_source(config: Config, name: str) -> Source:
    """Source `name` of `config`; it connects on first use."""
    return Source(name, config.sources[name])


def open_api(config: Config, limiter: RateLimiter) -> ApiClient:
    """The API client; the key it reads (inline, or from token_file, again on refusal) is
    registered with the log redactor."""
    from syncd.delivery import ApiClient, TokenSource

    return ApiClient(config.api, TokenSource(config.api, on_secret=register_secret), limiter)


def _rate_limiter(config: Config, state: StateStore) -> RateLimiter:
    """On a PostgreSQL state database several daemons may push: they share one ceiling there."""
    from syncd.delivery import RateLimiter, SharedRateLimiter

    rps = config.api.requests_per_second
    if not state.postgres:
        return RateLimiter(rps)
    return SharedRateLimiter(rps, lambda interval: state.reserve_request(config.api.url, interval))


def _register_secrets(config: Config) -> None:
    """Tell the log redactor every secret the config holds, before anything is logged."""
    import sqlalchemy as sa

    if config.api.token is not None:
        register_secret(config.api.token.get_secret_value())
    for source in config.sources.values():
        password = sa.make_url(source.url.get_secret_value()).password
        if password:
            register_secret(str(password))
        if source.password_file is not None:
            try:
                register_secret(read_secret_file(source.password_file, "password_file"))
            except SecretFileError:
                pass  # reported, by its key, when the source connects
