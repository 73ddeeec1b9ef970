"""A randomized fault checker for syncd, in the spirit of Jepsen (issue 10, "The checker").

One seed = one run: fresh source and state databases on PostgreSQL, the API simulator, 1 to 3
`syncd run` daemons reaching both databases through TCP proxies the harness can cut, writers
making the changes a CRM makes (inserts, updates, equal watermarks, same-second updates, late
commits, soft deletes where `filter` exists), and faults (API 429/5xx/stalls after the accept/
dropped connections, `kill -9`, SIGSTOP longer than the lease, cut links). Then everything is
healed, the daemons catch up, and the datastore's last record for every key is compared with
the source row: lost keys, stale keys, duplicates and removals are counted.

    python -m tests.faultcheck --seed 7            # replay one seed
    python -m tests.faultcheck --seeds 1-200       # a soak (make soak)

plan.py draws everything from the seed; harness.py plays it; checker.py judges.
"""
