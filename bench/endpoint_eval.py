"""Endpoint evaluation against in-process generation, side by side in one script: the same held-out rows answered
by the merged quickstart model in this process (transformers generate, batched, as evaluation does) and through the
endpoint client from `transformers serve` serving the same folder (evaluation.serve / a contender), at several
client concurrencies. Prints rows/s and generated tokens/s of each, whether the answers agree, and last the ratio
endpoint / in-process at the highest concurrency.

    python bench/endpoint_eval.py [--model ARTIFACT/model] [--rows 64] [--concurrency 1 4 8] [--server transformers|vllm]
                                  [--server-option=--continuous-batching]

Without --model it runs `ftpipe run quickstart` in a temporary folder first and uses its artifact.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_prep.formats import conversation_of  # noqa: E402
from data_prep.prepare import read_jsonl  # noqa: E402

SAMPLE_HELDOUT = ROOT / "recipes" / "data" / "support_tickets_heldout.jsonl"


def quickstart_model(folder: Path) -> Path:
    command = [sys.executable, "-m", "flows.cli", "run", "quickstart", "--output-dir", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PREFECT_HOME=str(folder / "prefect")))
    if result.returncode != 0:
        sys.exit(f"ftpipe run quickstart failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return Path(result.stdout.strip().splitlines()[-1].removeprefix("artifact: ")) / "model"


def in_process(model_dir: Path, conversations: list[list[dict]], max_new_tokens: int, batch_size: int) -> dict:
    from evaluation.generate import generate, load_model
    from training.models import load_saved_tokenizer

    model, tokenizer = load_model(str(model_dir)), load_saved_tokenizer(model_dir)
    throughput: dict = {}
    started = time.perf_counter()
    answers = generate(model, tokenizer, conversations, max_new_tokens, batch_size, throughput=throughput)
    seconds = time.perf_counter() - started
    return {"answers": answers, "seconds": seconds, "tokens": throughput["tokens"]}


def through_endpoint(url: str, model_dir: Path, conversations: list[list[dict]], max_new_tokens: int, concurrency: int) -> dict:
    from evaluation.endpoints import EndpointClient
    from recipes.schema import EndpointSection

    section = EndpointSection(name="bench", base_url=url, model=str(model_dir), concurrency=concurrency, timeout_s=600)
    with EndpointClient(section, max_new_tokens) as client:
        started = time.perf_counter()
        replies = client.answers(conversations)
        seconds = time.perf_counter() - started
    return {"answers": [r.content for r in replies], "seconds": seconds, "tokens": client.usage.completion_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a merged model folder (default: the quickstart's artifact, trained first)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="in-process generation batch (evaluation.generation.batch_size)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--server", choices=("transformers", "vllm"), default="transformers")
    parser.add_argument("--server-option", action="append", default=[], help="passed to the server (e.g. --continuous-batching)")
    args = parser.parse_args()

    from evaluation.served import local_server

    conversations = [conversation_of(row) for row in read_jsonl(str(SAMPLE_HELDOUT))[: args.rows]]
    with tempfile.TemporaryDirectory(prefix="ftpipe-endpoint-bench-") as folder:
        model_dir = args.model or quickstart_model(Path(folder))
        baseline = in_process(model_dir, conversations, args.max_new_tokens, args.batch_size)
        results = {}
        with local_server(args.server, model_dir, Path(folder) / "server.log", tuple(args.server_option)) as (url, server):
            through_endpoint(url, model_dir, conversations[:2], args.max_new_tokens, 1)  # warm-up: the first request loads the model
            for concurrency in args.concurrency:
                results[concurrency] = through_endpoint(url, model_dir, conversations, args.max_new_tokens, concurrency)
    rows = len(conversations)
    print(f"{rows} held-out rows, max {args.max_new_tokens} new tokens; server: {server}")
    print(f"in-process generate (batch {args.batch_size}): {baseline['seconds']:.2f} s, {rows / baseline['seconds']:.2f} rows/s, "
          f"{baseline['tokens'] / baseline['seconds']:.1f} tokens/s")
    for concurrency, found in results.items():
        agree = sum(a == b for a, b in zip(found["answers"], baseline["answers"], strict=True))
        print(f"endpoint, concurrency {concurrency}: {found['seconds']:.2f} s, {rows / found['seconds']:.2f} rows/s, "
              f"{found['tokens'] / found['seconds']:.1f} tokens/s (server-reported), answers equal to in-process: {agree}/{rows}")
    top = max(results)
    print(f"endpoint (concurrency {top}) / in-process rows/s = {baseline['seconds'] / results[top]['seconds']:.3f}")


if __name__ == "__main__":
    main()
