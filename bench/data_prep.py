"""Data-stage benchmark: throughput, peak memory and recall on planted problems, against plain datasets.map.

    python bench/data_prep.py [--rows 200000] [--workers 2] [--no-baseline] [--folder DIR]

Generates N synthetic chat rows with exact duplicates, near-duplicates, PII and bad rows planted at known
rates, prepares them with ftpipe's data stage (in a child process, so its peak RSS is the stage's own),
checks that every planted item was caught, and compares the stage's rows/s with a baseline of `datasets`
loading the same (well-formed) rows and running `map` with only text normalisation. Prints the ratio last.
Everything after generation streams, so `--rows 13400000` (a 5 GB file) measures the stage's memory at scale;
`--folder DIR` keeps the generated rows there and reuses them on the next run with the same --rows.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
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


def generate(path: Path, clean_path: Path | None, n: int, seed: int = 0) -> dict:
    """Write n rows (and the well-formed ones again to clean_path, for the baseline); return what was planted."""
    r = random.Random(seed)
    planted = {"exact": [], "near": [], "bad_lines": [], "pii": []}
    originals: list[tuple[str, str, str]] = []
    with path.open("w") as out, (clean_path or Path(os.devnull)).open("w") as clean:
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


def run_stage(source: str, out_dir: str, workers: int, result) -> None:
    """The data stage alone, timed (run in a child process)."""
    section = DataSection(sources=[DataSource(path=source)], eval_fraction=0.05, workers=workers)
    start = time.perf_counter()
    data = prepare_data(section, out_dir, reuse=False)
    result.put((time.perf_counter() - start, data.to_dict()))


def measure_stage(source: Path, out_dir: Path, workers: int) -> tuple[float, dict, float]:
    """(seconds, prepared data, peak RSS in MB of the stage's process or any of its workers)."""
    context = multiprocessing.get_context("spawn")
    result = context.Queue()
    process = context.Process(target=run_stage, args=(str(source), str(out_dir), workers, result))
    process.start()
    elapsed, data = result.get()
    process.join()
    if process.exitcode:
        raise SystemExit(f"the data stage failed (exit {process.exitcode})")
    return elapsed, data, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def recall(data: dict, planted: dict) -> dict[str, float]:
    """Share of planted items caught, reading the outputs line by line. A planted row carries the id of the
    row it copies: an exact copy is caught when no text with that id is written twice, a near copy when
    only one text with that id is written."""
    watched = set(planted["exact"]) | set(planted["near"])
    copies: dict[str, Counter] = {rid: Counter() for rid in watched}
    pii_values = {value for _, value in planted["pii"]}
    leaked = set()
    for path in (data["train_path"], data["eval_path"]):
        with open(path, encoding="utf-8") as f:
            for line in f:
                rid = line.split('"content":"', 1)[1].split(" ", 1)[0] if '"content":"row' in line else None
                if rid in copies:
                    copies[rid][hash(line)] += 1
                if "contact " in line and (value := line.split("contact ", 1)[1].split(" today", 1)[0]) in pii_values:
                    leaked.add(value)
    with open(data["quarantine_path"], encoding="utf-8") as f:
        quarantined = {json.loads(line)["row"] for line in f}
    return {
        "exact duplicates": sum(max(copies[rid].values(), default=0) <= 1 for rid in planted["exact"]) / max(len(planted["exact"]), 1),
        "near duplicates": sum(len(copies[rid]) <= 1 for rid in planted["near"]) / max(len(planted["near"]), 1),
        "bad rows": len(quarantined & set(planted["bad_lines"])) / max(len(planted["bad_lines"]), 1),
        "PII": 1 - len(leaked) / max(len(pii_values), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-baseline", action="store_true", help="skip the datasets baseline (for very large N)")
    parser.add_argument("--folder", type=Path, help="generate into (and reuse from) this folder; kept afterwards")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="ftpipe-bench-data-"))
    folder.mkdir(parents=True, exist_ok=True)
    source, clean, planted_path = folder / "rows.jsonl", folder / "clean.jsonl", folder / f"planted-{args.rows}.json"
    if planted_path.is_file() and source.is_file() and (args.no_baseline or clean.is_file()):
        planted = json.loads(planted_path.read_text())
    else:
        planted = generate(source, None if args.no_baseline else clean, args.rows)
        planted_path.write_text(json.dumps(planted))
    print(f"generated {args.rows} rows ({source.stat().st_size / 1e6:,.0f} MB) in {folder}: {len(planted['exact'])} exact and "
          f"{len(planted['near'])} near duplicates, {len(planted['pii'])} PII values, {len(planted['bad_lines'])} bad rows")

    elapsed, data, peak_mb = measure_stage(source, folder / "out", args.workers)
    rows_per_s = args.rows / elapsed
    counts = data["sources"][0]
    print(f"ftpipe data stage: {elapsed:.1f} s, {rows_per_s:,.0f} rows/s, peak RSS {peak_mb:,.0f} MB (stage process or largest worker)")
    print(f"counts: in {counts['rows_in']}, kept {counts['kept']}, quarantined {counts['quarantined']}, removed {counts['removed']}, "
          f"PII {counts['pii_redacted']}, reconciles {counts['rows_in'] == counts['kept'] + counts['quarantined'] + sum(counts['removed'].values())}")
    for name, value in recall(data, planted).items():
        print(f"recall {name}: {value:.4f}")
    if not args.no_baseline:
        base_rate, base_rows = baseline_rows_per_s(clean, args.workers)
        print(f"baseline datasets.load_dataset + map(normalise), num_proc={args.workers}: {base_rate:,.0f} rows/s on {base_rows} rows")
        print(f"ratio ftpipe / baseline rows/s: {rows_per_s / base_rate:.2f}")
    if args.folder is None:
        shutil.rmtree(folder)
    else:
        shutil.rmtree(folder / "out")


if __name__ == "__main__":
    main()
