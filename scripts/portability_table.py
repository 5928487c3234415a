"""The figures scripts/check_portability.sh collected, as one markdown table per test (rows: CPU path, seed)."""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    by_test = defaultdict(list)
    for row in rows:
        by_test[row.pop("test")].append(row)
    for test, results in by_test.items():
        names = [k for k in results[0] if k not in ("seed", "cpu")]
        print(f"\n{test}\n\n| CPU path | seed | " + " | ".join(names) + " |")
        print("|---|---|" + "---|" * len(names))
        for r in sorted(results, key=lambda r: (r["cpu"], r["seed"])):
            cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k)) for k in names]
            print(f"| {r['cpu']} | {r['seed']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
