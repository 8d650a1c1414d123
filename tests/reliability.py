"""The README's reliability table, printed from what the last ``fault`` test run measured
(``.cache/reliability/<scenario>.json``, written by tests/fault): ``python -m tests.reliability``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPORT_DIR = Path(__file__).resolve().parents[1] / ".cache" / "reliability"
ORDER = (
    "worker kill -9 (x2)",
    "worker kill -9 (x2) [exactly_once]",
    "worker kill -9 (x2) [faust]",
    "rebalance 1 -> 3 -> 1 workers",
    "rebalance 1 -> 3 -> 1 workers [exactly_once]",
    "rebalance 1 -> 3 -> 1 workers [faust]",
    "broker restart",
    "broker restart [exactly_once]",
    "broker failover (3 nodes, RF 3)",
    "malformed barrage",
    "hostile records (direct, at_least_once)",
    "hostile records (direct, exactly_once)",
    "hostile records (faust, at_least_once)",
    "abandoned streams",
)
HEADER = (
    "| scenario | completions | in flight at fault | faults injected | bad records | lost "
    "| repeated done / events before de-dup | after de-dup | recovery |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def row(r: dict[str, Any]) -> str:
    name = r["scenario"]
    if name == "malformed barrage":
        reasons = ", ".join(f"{n:,} {reason}" for reason, n in sorted(r["dead_letter_reasons"].items()))
        anomalies = ", ".join(f"{n} {k}" for k, n in sorted(r["counted_as_anomalies"].items()))
        cells = [
            f"{r['in_flight']}",
            f"{r['dead_lettered']:,} dead-lettered ({reasons}); on their completions: {anomalies}",
            f"{r['bad_records']:,}",
            str(r["lost"]),
            f"{r['repeated_done_before_dedup']} / –",
            str(r["duplicated_after_dedup"]),
            "worker never restarted",
        ]
    elif name.startswith("hostile records"):
        reasons = ", ".join(f"{n:,} {reason}" for reason, n in sorted(r["dead_letter_reasons"].items()))
        statuses = ", ".join(
            f"{n} {status}" for status, n in sorted(r["hostile_completion_statuses"].items())
        )
        cells = [
            "–",
            f"{r['dead_lettered']:,} dead-lettered ({reasons}); hostile completions ended: {statuses}; "
            f"{r['truncated_outputs']} done records cut to fit, largest output "
            f"{r['largest_output_bytes']:,} B",
            f"{r['hostile_records']:,}",
            str(r["lost"]),
            "–",
            "–",
            "worker never restarted",
        ]
    elif name == "abandoned streams":
        growth = r["second_half_peak_over_first"]
        cells = [
            f"peak {r['peak_open']:.0f} open",
            f"no end marker; idle timeout 1 s, tombstones 1 s; {r['duration_s']} s",
            "0",
            str(r["lost"]),
            "–",
            "–",
            f"{r['completions_per_peak_open']}x the peak open passed; peak state "
            f"{r['peak_state_bytes'] / 1000:.0f} KB ({r['written_per_peak_held']}x held written); "
            f"second half / first half peak: open {growth['chunkfold_open_completions']}, state "
            f"{growth['chunkfold_state_bytes']}, RSS {growth['rss_bytes']} "
            f"({r['rss_mb_first_last'][0]} -> {r['rss_mb_first_last'][1]} MB); "
            f"{r['final_state_bytes']:.0f} B at the end",
        ]
    else:
        faults = r["faults"]
        what = (
            f"{faults[0]} (x{len(faults)})"
            if len(set(faults)) == 1 and len(faults) > 1
            else "; ".join(faults)
        )
        cells = [
            " / ".join(str(n) for n in r["in_flight"]),
            what,
            str(r["bad_records"]),
            str(r["lost"]),
            f"{r['repeated_done_before_dedup']} / {r['repeated_events_before_dedup']}",
            str(r["duplicated_after_dedup"]),
            f"{r['recovery_s']} s",
        ]
    return f"| {name} | {r['completions']:,} | " + " | ".join(cells) + " |"


def main() -> int:
    reports = {p.stem: json.loads(p.read_text()) for p in REPORT_DIR.glob("*.json")}
    missing = [name for name in ORDER if name not in reports]
    if missing:
        print(f"no figures for {', '.join(missing)}: run the fault tests first", file=sys.stderr)
        return 1
    print(HEADER)
    for name in ORDER:
        print(row(reports[name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
