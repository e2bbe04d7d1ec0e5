"""Data-stage benchmark: throughput, peak memory and recall on planted problems, against plain datasets.map.

    python bench/data_prep.py [--rows 200000] [--workers 2]

Generates N synthetic chat rows with exact duplicates, near-duplicates, PII and bad rows planted at known
rates, prepares them with ftpipe's data stage, checks that every planted item was caught, and compares
the stage's rows/s with a baseline of `datasets` loading the same (well-formed) rows and running `map` with
only text normalisation. Prints the ratio last.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep.formats import normalise_text  # noqa: E402
from data_prep.prepare import prepare_data  # noqa: E402
from recipes.schema import DataSection, DataSource  # noqa: E402

WORDS = [f"{a}{b}{c}" for a in "bcdfgklmnprst" for b in "aeiou" for c in ("", "n", "r", "s", "l", "t")]
PII = {
    "email": lambda r: f"{r.choice(WORDS)}.{r.choice(WORDS)}@example{r.randint(1, 99)}.com",
    "phone": lambda r: f"+44 20 {r.randint(1000, 9999)} {r.randint(1000, 9999)}",
    "credit_card": lambda r: _luhn_number(r),
    "iban": lambda r: _iban(r),
    "ip_address": lambda r: f"10.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}",
    "secret": lambda r: "AKIA" + "".join(r.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16)),
}
BAD = ['{"messages": [broken', '{"messages": [{"role": "assistant", "content": "no user"}]}',
       '{"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "x"}]}', '{"unknown": 1}']


def _luhn_number(r: random.Random) -> str:
    digits = [4] + [r.randint(0, 9) for _ in range(14)]
    total = sum(d if i % 2 else (d * 2 - 9 if d > 4 else d * 2) for i, d in enumerate(reversed(digits)))
    digits.append((10 - total % 10) % 10)
    return " ".join("".join(map(str, digits[i : i + 4])) for i in range(0, 16, 4))


def _iban(r: random.Random) -> str:
    bban = "".join(str(r.randint(0, 9)) for _ in range(18))
    check = 98 - int("".join(str(int(c, 36)) for c in bban + "DE00")) % 97
    return f"DE{check:02d}{bban}"


def sentence(r: random.Random, n: int) -> str:
    return " ".join(r.choice(WORDS) for _ in range(n))


def generate(path: Path, clean_path: Path, n: int, seed: int = 0) -> dict:
    """Write n rows; return what was planted (by row id and line number)."""
    r = random.Random(seed)
    planted = {"exact": [], "near": [], "bad_lines": [], "pii": []}
    originals: list[tuple[str, str, str]] = []
    with path.open("w") as out, clean_path.open("w") as clean:
        for line_no in range(1, n + 1):
            roll = r.random()
            if roll < 0.01:
                out.write(r.choice(BAD) + "\n")
                planted["bad_lines"].append(line_no)
                continue
            if roll < 0.03 and originals:
                rid, user, answer = r.choice(originals)
                planted["exact"].append(rid)
                user = "  " + user.replace(" ", "  ", 3) + " "  # identical once whitespace is normalised
            elif roll < 0.05 and originals:
                rid, user, answer = r.choice(originals)
                planted["near"].append(rid)
                words = user.split()
                words[r.randrange(2, len(words))] = r.choice(WORDS)  # one word changed in ~60
                user = " ".join(words)
            else:
                rid = f"row{line_no}"
                user, answer = f"{rid} " + sentence(r, r.randint(50, 70)), sentence(r, r.randint(8, 20))
                if r.random() < 0.03:
                    kind = r.choice(sorted(PII))
                    value = PII[kind](r)
                    planted["pii"].append((kind, value))
                    user += f" contact {value} today"
                if len(originals) < 50_000:
                    originals.append((rid, user, answer))
            line = json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}) + "\n"
            out.write(line)
            clean.write(line)
    return planted


def baseline_rows_per_s(clean_path: Path, workers: int) -> tuple[float, int]:
    """Plain datasets: load the JSONL and map a text normalisation over it (no validation, dedup or PII)."""
    from datasets import disable_caching, load_dataset

    disable_caching()
    start = time.perf_counter()
    dataset = load_dataset("json", data_files=str(clean_path), split="train")
    dataset = dataset.map(lambda row: {"messages": [{**m, "content": normalise_text(m["content"])} for m in row["messages"]]},
                          num_proc=workers if workers > 1 else None)
    return len(dataset) / (time.perf_counter() - start), len(dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ftpipe-bench-data-"))
    source, clean = folder / "rows.jsonl", folder / "clean.jsonl"
    planted = generate(source, clean, args.rows)
    print(f"generated {args.rows} rows ({source.stat().st_size / 1e6:.0f} MB) in {folder}: {len(planted['exact'])} exact and "
          f"{len(planted['near'])} near duplicates, {len(planted['pii'])} PII values, {len(planted['bad_lines'])} bad rows")

    section = DataSection(sources=[DataSource(path=str(source))], eval_fraction=0.05, workers=args.workers)
    start = time.perf_counter()
    data = prepare_data(section, folder / "out", reuse=False)
    elapsed = time.perf_counter() - start
    rows_per_s = args.rows / elapsed
    peak_mb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024

    output = Path(data.train_path).read_text() + Path(data.eval_path).read_text()
    ids = [line.split('"content": "', 1)[1].split(" ", 1)[0] for line in output.splitlines() if '"content": "row' in line]
    seen: dict[str, int] = {}
    for rid in ids:
        seen[rid] = seen.get(rid, 0) + 1
    quarantined = {json.loads(line)["row"] for line in Path(data.quarantine_path).read_text().splitlines()}
    recall = {
        "exact duplicates": sum(seen.get(rid, 0) <= 1 for rid in planted["exact"]) / max(len(planted["exact"]), 1),
        "near duplicates": sum(seen.get(rid, 0) <= 1 for rid in planted["near"]) / max(len(planted["near"]), 1),
        "bad rows": len(quarantined & set(planted["bad_lines"])) / max(len(planted["bad_lines"]), 1),
        "PII": sum(value not in output for _, value in planted["pii"]) / max(len(planted["pii"]), 1),
    }
    source_counts = data.sources[0]
    print(f"ftpipe data stage: {elapsed:.1f} s, {rows_per_s:,.0f} rows/s, peak RSS {peak_mb:,.0f} MB (parent or largest worker)")
    print(f"counts: in {source_counts.rows_in}, kept {source_counts.kept}, quarantined {source_counts.quarantined}, "
          f"removed {source_counts.removed}, PII {source_counts.pii_redacted}, reconciles {source_counts.reconciles()}")
    for name, value in recall.items():
        print(f"recall {name}: {value:.4f}")
    base_rate, base_rows = baseline_rows_per_s(clean, args.workers)
    print(f"baseline datasets.load_dataset + map(normalise), num_proc={args.workers}: {base_rate:,.0f} rows/s on {base_rows} rows")
    print(f"ratio ftpipe / baseline rows/s: {rows_per_s / base_rate:.2f}")


if __name__ == "__main__":
    main()
