"""Deterministic synthetic enterprise task: route a support ticket to a team and a priority, answering JSON.

The shipped sample data (recipes/data/support_tickets_*.jsonl, chat rows for SFT and preference rows for DPO) is
made by this script:

    python -m data_prep.synthetic --out recipes/data

Team is decided by what the ticket is about, priority by how the customer words the urgency, so a small
model can learn the mapping exactly while an untrained one scores zero.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM_PROMPT = 'Route the support ticket. Answer only with JSON: {"team": ..., "priority": ...}.'

TOPICS = {
    "billing": [
        "I was charged twice for my last invoice",
        "the refund for order {order} has not arrived",
        "my credit note is missing from the invoice",
        "the invoice shows the wrong VAT number",
        "I need a copy of the receipt for order {order}",
    ],
    "accounts": [
        "I cannot log in after the password reset",
        "please change the email address on my account",
        "my account {order} was locked after too many attempts",
        "the two-factor code never arrives",
        "I want to add a colleague as an account admin",
    ],
    "technical": [
        "the mobile app crashes when I open the dashboard",
        "the export to CSV fails with an error",
        "the API returns a timeout for request {order}",
        "the sync between devices stopped working",
        "the page stays blank after the latest update",
    ],
    "shipping": [
        "parcel {order} is still not delivered",
        "the courier left my package at the wrong address",
        "tracking for shipment {order} has not moved for days",
        "the delivery arrived damaged",
        "I need to change the delivery date of order {order}",
    ],
}

URGENCY = {
    "high": ["This is urgent, we are blocked.", "Please fix this today, it is critical.", "We need help immediately."],
    "medium": ["Please look into it this week.", "Could you check this soon?", "Let me know when you can."],
    "low": ["No rush, whenever you have time.", "Just a small thing for later.", "Low priority, thanks."],
}

GREETINGS = ["Hi,", "Hello,", "Dear support,", "Good morning,", "Hey team,"]
SIGN_OFFS = ["Thanks, {name}", "Best regards, {name}", "Cheers, {name}", "{name}"]
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena", "Mateo", "Nia"]


def make_row(rng: random.Random) -> dict:
    """One chat row: system, user ticket, assistant JSON answer."""
    team = rng.choice(sorted(TOPICS))
    priority = rng.choice(sorted(URGENCY))
    issue = rng.choice(TOPICS[team]).format(order=rng.randint(10000, 99999))
    ticket = " ".join(
        [
            rng.choice(GREETINGS),
            issue[0].upper() + issue[1:] + ".",
            rng.choice(URGENCY[priority]),
            rng.choice(SIGN_OFFS).format(name=rng.choice(NAMES)),
        ]
    )
    answer = json.dumps({"team": team, "priority": priority})
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": ticket},
            {"role": "assistant", "content": answer},
        ]
    }


def make_preference_row(rng: random.Random) -> dict:
    """One preference row for DPO: the ticket, the right routing (chosen) and a plausible wrong one (rejected:
    the team or the priority of another answer)."""
    *prompt, answer = make_row(rng)["messages"]
    right = json.loads(answer["content"])
    field, options = rng.choice([("team", sorted(TOPICS)), ("priority", sorted(URGENCY))])
    wrong = {**right, field: rng.choice([o for o in options if o != right[field]])}
    return {"prompt": prompt, "chosen": [answer], "rejected": [{"role": "assistant", "content": json.dumps(wrong)}]}


def generate(n: int, seed: int, preference: bool = False) -> list[dict]:
    rng = random.Random(seed)
    make = make_preference_row if preference else make_row
    return [make(rng) for _ in range(n)]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "recipes" / "data")
    parser.add_argument("--train-rows", type=int, default=1200)
    parser.add_argument("--heldout-rows", type=int, default=200)
    args = parser.parse_args(argv)
    write_jsonl(generate(args.train_rows, seed=1), args.out / "support_tickets_train.jsonl")
    write_jsonl(generate(args.heldout_rows, seed=2), args.out / "support_tickets_heldout.jsonl")
    write_jsonl(generate(args.train_rows // 2, seed=3, preference=True), args.out / "support_tickets_preferences_train.jsonl")
    write_jsonl(generate(args.heldout_rows // 2, seed=4, preference=True), args.out / "support_tickets_preferences_heldout.jsonl")
    print(f"wrote {args.train_rows} training and {args.heldout_rows} held-out chat rows, and half as many preference rows, to {args.out}")


if __name__ == "__main__":
    main()
