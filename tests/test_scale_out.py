"""Scale-out on a PostgreSQL state database: one daemon runs a sync at a time; another takes over."""

from __future__ import annotations

import time

from syncd.config import load_config
from syncd.runtime import Runtime

from .crm import Crm, contact, write_config
from .test_pipeline import api, pushed_records  # noqa: F401  (fixture)


def test_a_sync_runs_on_one_daemon_and_moves_when_it_dies(postgres_url, api, tmp_path):  # noqa: F811
    crm = Crm(postgres_url)
    crm.insert([contact(i) for i in range(1, 41)])
    path = write_config(
        tmp_path / "syncd.toml", source_url=postgres_url, api_url=api.url, state_url=postgres_url, batch=10
    )
    path.write_text(path.read_text().replace("[state]\n", '[state]\nlease = "1s"\n'))
    config = load_config(path)
    first, second = Runtime.open(config), Runtime.open(config)
    try:
        assert first.runners["contacts"].run_cycle().outcome == "ok"
        skipped = second.runners["contacts"].run_cycle()
        assert skipped.outcome == "skipped" and "running on" in skipped.error
        assert pushed_records(api) == 40

        # The first daemon dies without releasing its lease; new rows arrive.
        crm.insert([contact(i) for i in range(41, 61)])
        time.sleep(1.2)  # the lease (1 s) runs out
        report = second.runners["contacts"].run_cycle()
        assert report.outcome == "ok" and report.sent == 20  # continues from the shared watermark
        assert pushed_records(api) == 60
        assert first.runners["contacts"].run_cycle().outcome == "skipped"  # and the first cannot come back
    finally:
        second.close()
        first.client.close()
        crm.dispose()
