"""Four real CRMs as test fixtures: their published contact schemas, filled with realistic data.

Each module rebuilds one CRM's contact tables from the CRM's own schema files (cited in its
docstring) on the database that CRM runs on, and writes to them the way that CRM does:
SuiteCRM 7, EspoCRM and vtiger 7 on MariaDB, Odoo 17 on PostgreSQL. `people` generates the
contacts they share (seeded, so a failure is reproducible) together with what a correct sync
must deliver for each of them, worked out from the generated data alone.
"""
