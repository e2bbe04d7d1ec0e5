"""Batched greedy generation and masked eval loss, on prompts tokenized exactly as for training and serving."""
from __future__ import annotations

import math

from data_prep.formats import split_reasoning
from training.tokenize import IGNORE, Encoded, encode_chat, encode_conversation, final_turn_only, ids_of, prompt_ids, reasoning_mode


def load_model(path: str, revision: str | None = None, dtype: str | None = None, trust_remote_code: bool = False, tokenizer=None,
               quantization_config=None):
    """A causal LM for inference: 16-bit weights on GPU, float32 on CPU (never quantized; a quantized export is read
    through its quantization_config, dequantized). Given the tokenizer training used, the embeddings grow to its
    vocabulary (tokens added for the chat template), as in training."""
    import torch
    from transformers import AutoModelForCausalLM

    from training.models import fit_embeddings

    if dtype is None:
        dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
                                                 **({"quantization_config": quantization_config} if quantization_config else {}))
    if tokenizer is not None:
        fit_embeddings(model, tokenizer)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def stop_token_ids(tokenizer, model) -> list[int]:
    """End-of-turn plus whatever the model's generation config already stops on."""
    ids = {tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return sorted(i for i in ids if i is not None)


def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int,
             sampling: dict | None = None, seed: int = 0, throughput: dict | None = None,
             reasoning_tokens: list[int] | None = None) -> list[str]:
    """Answers to each conversation's final user turn (its last assistant turn is left out): greedy, or sampled
    with `sampling` (generate() keyword arguments) from a fixed seed. Generated tokens and seconds are added to
    `throughput` when given (the serving-cost projection's measured rate). Answers come without their reasoning
    (`<think>...</think>`, or all of an unclosed block the template opened), as a server's reasoning parser returns
    `content`; the reasoning's length in tokens is appended to `reasoning_tokens` when given."""
    import time

    import torch

    sampling = sampling or {"do_sample": False}
    if sampling.get("do_sample"):
        torch.manual_seed(seed)
    prompts = [prompt_ids(tokenizer, messages) for messages in conversations]
    opened = reasoning_mode(tokenizer) == "forced"
    stops = stop_token_ids(tokenizer, model)
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in batch], device=model.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        started = time.perf_counter()
        with torch.no_grad():
            generated = model.generate(
                input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens, **sampling,
                eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
            )
        if throughput is not None:
            throughput["seconds"] = throughput.get("seconds", 0.0) + time.perf_counter() - started
            throughput["tokens"] = throughput.get("tokens", 0) + int((generated[:, width:] != tokenizer.pad_token_id).sum())
        for row in generated[:, width:]:
            reasoning, answer = split_reasoning(tokenizer.decode(row, skip_special_tokens=True).strip(), opened)
            outputs.append(answer.strip())
            if reasoning_tokens is not None:
                reasoning_tokens.append(len(ids_of(tokenizer, reasoning)) if reasoning else 0)
    return outputs


def answer_all(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int, sampling: dict | None = None,
               seed: int = 0, throughput: dict | None = None, reasoning_tokens: list[int] | None = None) -> list[str]:
    """generate() for a model in this process; for an endpoint (evaluation.endpoints.EndpointClient, tokenizer None) the
    same prompts sent to it, its tokens and seconds taken from the server's reported usage."""
    if tokenizer is not None:
        return generate(model, tokenizer, conversations, max_new_tokens, batch_size, sampling, seed, throughput, reasoning_tokens)
    before = (model.usage.completion_tokens, model.usage.wall_s)
    replies = model.answers(conversations, max_new_tokens, sampling, seed)
    if throughput is not None:
        throughput["tokens"] = throughput.get("tokens", 0) + model.usage.completion_tokens - before[0]
        throughput["seconds"] = throughput.get("seconds", 0.0) + model.usage.wall_s - before[1]
    if reasoning_tokens is not None:
        reasoning_tokens.extend(0 for _ in replies)  # a server returns reasoning apart (reasoning_content), not counted here
    return [reply.content for reply in replies]


def eval_loss(model, tokenizer, conversations: list[list[dict]], batch_size: int) -> float:
    """Mean negative log-likelihood per assistant token (the tokens training puts a loss on)."""
    per_row = eval_losses(model, tokenizer, conversations, batch_size)
    tokens = sum(count for _, count in per_row)
    return sum(total for total, _ in per_row) / tokens if tokens else math.nan


def eval_losses(model, tokenizer, conversations: list[list[dict]], batch_size: int) -> list[tuple[float, int]]:
    """Per conversation: summed negative log-likelihood of its assistant tokens, and how many there are (what a
    bootstrap over rows resamples)."""
    encoded, owner = [], []
    for row, messages in enumerate(conversations):
        pieces = encode_conversation(tokenizer, messages)
        encoded += pieces
        owner += [row] * len(pieces)
    per_row = [[0.0, 0] for _ in conversations]
    for row, (total, count) in zip(owner, scored_log_probs(model, tokenizer, encoded, batch_size), strict=True):
        per_row[row][0] -= total
        per_row[row][1] += count
    return [(total, count) for total, count in per_row]


def preference_margins(model, tokenizer, rows: list[dict], batch_size: int) -> list[float]:
    """Per preference row: log p(chosen answer) - log p(rejected answer) given the prompt (summed over the answer's
    tokens, end-of-turn included). Positive means the model prefers the chosen answer."""
    scores = {answer: scored_log_probs(model, tokenizer, [final_turn_only(encode_chat(tokenizer, row["prompt"] + row[answer]))
                                                         for row in rows], batch_size) for answer in ("chosen", "rejected")}
    return [chosen - rejected for (chosen, _), (rejected, _) in zip(scores["chosen"], scores["rejected"], strict=True)]


def scored_log_probs(model, tokenizer, encoded: list[Encoded], batch_size: int) -> list[tuple[float, int]]:
    """For each sequence: the summed log-probability of its labelled tokens, and how many there are."""
    import torch

    scores: list[tuple[float, int]] = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        width = max(len(e.input_ids) for e in batch)
        ids = torch.tensor([e.input_ids + [tokenizer.pad_token_id] * (width - len(e.input_ids)) for e in batch], device=model.device)
        labels = torch.tensor([e.labels + [IGNORE] * (width - len(e.labels)) for e in batch], device=model.device)
        attention = (torch.arange(width, device=model.device)[None, :] < torch.tensor([len(e.input_ids) for e in batch], device=model.device)[:, None]).long()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention).logits.float()
        shifted = labels[:, 1:]
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, shifted.clamp(min=0)[..., None]).squeeze(-1)
        scored = shifted != IGNORE
        totals = (log_probs * scored).sum(dim=1)
        scores += [(float(total), int(count)) for total, count in zip(totals, scored.sum(dim=1), strict=True)]
    return scores
