"""Generate Conveyor's Grafana dashboards (provisioned JSON) from one description.

Run ``.venv/bin/python tools/k8s/gen_dashboards.py`` after editing this file; it rewrites
``deploy/k8s/components/monitoring/dashboards/*.json`` (committed, shipped as ConfigMaps by the
monitoring component). ``--check`` exits 1 when the committed JSON differs from what it would write
(tests/unit/test_k8s_dashboards.py runs it).

Conventions (docs: ecosystem notes 2.1): fixed ``uid``, ``"id": null``, a ``datasource`` variable
that every panel uses as ``${datasource}``, a ``namespace`` variable, ``$__rate_interval`` in
``rate()``/``increase()``, no ``__inputs`` (provisioning does not resolve them). Leader-refreshed
scheduler gauges are read from the leader's series only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _dashboards_model import dashboard_json
from _dashboards_overview import overview
from _dashboards_services import delivery, provider

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "deploy" / "k8s" / "components" / "monitoring" / "dashboards"


DASHBOARDS = {
    "conveyor-overview": ("Conveyor / Overview", overview),
    "conveyor-provider": ("Conveyor / Provider", provider),
    "conveyor-delivery": ("Conveyor / Delivery", delivery),
}


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {
        f"{uid}.json": json.dumps(dashboard_json(uid, title, build()), indent=2) + "\n"
        for uid, (title, build) in DASHBOARDS.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="fail when the committed JSON is stale"
    )
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = OUT / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        sys.stderr.write(
            f"stale dashboards (run tools/k8s/gen_dashboards.py): {', '.join(stale)}\n"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
