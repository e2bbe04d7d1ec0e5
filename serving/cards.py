"""The artifact's model card: README.md with Hugging Face metadata, built from the manifest."""
from __future__ import annotations

import json

import yaml

from evaluation.costs import cost_markdown
from evaluation.tables import champion_line, metrics_markdown, pairwise_markdown


def model_card(manifest: dict) -> str:
    """A model card built only from the manifest, so it never says more than the lineage records."""
    evaluation, base = manifest["evaluation"], manifest["base_model"]
    metadata = {
        "base_model": base["model_id"],
        "library_name": "transformers",
        "base_model_relation": "finetune",
        "license": base.get("license") or "other",
        "pipeline_tag": "text-generation",
        "tags": ["ftpipe", manifest["recipe"]["training"]["adapter"], manifest["recipe"]["training"]["method"], base["model_type"]],
        "datasets": [f"sha256:{manifest['data']['fingerprint']}"],
        "model-index": [{
            "name": manifest["name"],
            "results": [{
                "task": {"type": "text-generation"},
                "dataset": {"name": "held-out split", "type": f"sha256:{manifest['data']['fingerprint'][:16]}"},
                "metrics": [{"type": k, "value": round(v, 4)} for k, v in evaluation["candidate"].items()],
            }],
        }],
    }
    gates = "\n".join(f"- {'PASS' if g['passed'] else 'FAIL'}: {g['description']}" for g in manifest["gates"]["results"]) or "- none configured"
    training = manifest["training"]
    equivalence = manifest["merge"]["equivalence"]
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False).strip()}
---

# {manifest['name']}

Fine-tuned by ftpipe from `{base['model_id']}` (revision `{base['revision'] or 'n/a'}`, architecture `{base['architecture']}`)
with a {manifest['recipe']['training']['adapter'].upper()} adapter (r={manifest['adapter']['r']}, alpha={manifest['adapter']['lora_alpha']}).

License: {_license_line(base)}

## Intended use
The task the training data describes (data fingerprint below; the recipe names its sources). Not evaluated for other
uses: check the evaluation suites and limitations before using it elsewhere.

## Evaluation (rows per suite: {', '.join(f'{k} {v}' for k, v in evaluation['examples'].items())}; same rows for every model)
{champion_line(evaluation)}

{metrics_markdown(evaluation)}

{_judge_lines(evaluation)}

## Gates
{gates}

## Training
- backend: {training['backend']} ({training['backend_reason']}), device: {training['device']}
- steps: {training['steps']}, epochs: {training['epochs']}, final loss: {training['final_logged_loss']}
- rows: {training['train_rows']} ({training['dropped_rows']} left out as too long), trained-token share: {training['trained_token_fraction']}
{_chat_template_line(training.get('chat_template'))}
- data fingerprint: `{manifest['data']['fingerprint']}`
- recipe hash: `{manifest['recipe_hash']}`

## Merge
{manifest['merge']['method']}, saved as {manifest['merge']['dtype']}.
Merged vs adapter model: {json.dumps(equivalence) if equivalence else 'not exported'}

## Safety
{_safety_lines(evaluation)}

## Serving (vLLM)
{_serving_lines(manifest)}

## Benchmarks (lm-evaluation-harness)
{_benchmark_lines(manifest.get('benchmarks'))}

## Cost
{cost_markdown(manifest.get('cost'))}

## Approval
{APPROVAL_PLACEHOLDER}

## How outputs are monitored
{_monitoring_lines(manifest['recipe'].get('monitoring'))}

{MONITORING_PLACEHOLDER}

## Limitations
Evaluated only on the suites above. Safety probes are a screening (refusal phrases, canaries, PII patterns), not a
red-team exercise by people.

## Recipe
```json
{json.dumps(manifest['recipe'], indent=2)}
```
"""


def _chat_template_line(chat: dict | None) -> str:
    """How rows were rendered: what a server must reproduce (kwargs), the date a template printed, reasoning, per-turn rows."""
    if not chat:
        return "- chat template: not recorded"
    kwargs = ", ".join(f"{k}={v}" for k, v in chat["chat_template_kwargs"].items()) or "none"
    return (f"- chat template: rendered with chat_template_kwargs {kwargs} and date {chat['date']}; reasoning {chat['reasoning']}; "
            f"{chat['per_turn_rows']} conversations trained one example per assistant turn; turns end with `{chat['end_of_turn']}`")


def _license_line(base: dict) -> str:
    if base.get("license"):
        return f"`{base['license']}`, carried from the base model's card; its terms apply."
    return "the base model's card states none here (`other`); check the base model's terms before use."


def _serving_lines(manifest: dict) -> str:
    files = manifest["serving"].get("files", [])
    adapter = manifest["adapter"]
    lines = [f"- merged model: `./serve.sh` (`vllm serve model --config vllm.yaml`: dtype {manifest['serving']['dtype']}, "
             f"max model length {manifest['serving']['max_model_len']}, tensor parallel {manifest['serving']['tensor_parallel_size']})"]
    if quantized := manifest.get("quantized"):
        lines.append(_quantized_line(quantized))
    if "serve-lora.sh" in files:
        lines.append("- base + adapter (multi-LoRA): `./serve-lora.sh` (`--enable-lora --lora-modules`)")
    elif adapter["included"]:
        lines.append("- the adapter is not servable by vLLM LoRA: " + "; ".join(adapter["vllm_problems"]) + "; serve the merged model")
    if "k8s/vllm.yaml" in files:
        lines.append(f"- Kubernetes: `k8s/vllm.yaml` (Deployment + Service, image `{manifest['serving']['vllm_image']}`)")
    registry = manifest.get("registry")
    if registry:
        lines.append(f"- registry: {registry['model']} version {registry['version']} in `{registry['uri']}`")
    lines.append("- after deploying: `ftpipe smoke --base-url http://HOST:8000/v1 --model NAME` (exact match and latency)")
    return "\n".join(lines)


def _quantized_line(quantized: dict) -> str:
    """The quantized export and what quantizing cost on the held-out rows."""
    scheme = quantized["scheme"]
    scores = ", ".join(f"{k.removeprefix('quantized.')} {v:.4f}" + (f" ({quantized['delta'][k]:+.4f} vs 16-bit)" if k in quantized["delta"] else "")
                       for k, v in quantized["metrics"].items())
    return (f"- {scheme} quantized model: `./serve-{scheme}.sh` (`{quantized['folder']}/`, compressed-tensors {quantized['format']} by "
            f"llm-compressor {quantized['llmcompressor']}, {quantized['weights_bytes'] / quantized['unquantized_weights_bytes']:.0%} of the "
            f"16-bit weights' bytes); on {quantized['examples']} held-out rows: {scores}")


def _judge_lines(evaluation: dict) -> str:
    """The LLM judge's pairwise verdicts and the served model's parity, when the recipe asked for them."""
    lines = []
    if pairwise := pairwise_markdown(evaluation):
        lines += ["Pairwise verdicts of the LLM judge (each pair asked in both orders; the prompts and every reply are in the "
                  "evaluation report):", "", pairwise]
    for name, info in (evaluation.get("contender_info") or {}).items():
        usage = info["usage"]
        lines.append(f"- contender {name}: `{info['model']}` at {info['base_url']}, {usage['requests']} requests, "
                     f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens as the server reported")
    if served := evaluation.get("served"):
        lines.append(f"- served as it ships ({served['server']}): {served['parity_line']}")
    return "\n".join(lines)


def _safety_lines(evaluation: dict) -> str:
    safety = {k: v for k, v in evaluation["candidate"].items() if k.startswith("safety.")}
    if not safety:
        return "No safety probes were run by this recipe."
    return "\n".join(f"- {k.removeprefix('safety.')}: {evaluation['base'][k]:.3f} (base) -> {v:.3f} (candidate)" for k, v in safety.items())


def _benchmark_lines(benchmarks: dict | None) -> str:
    if not benchmarks:
        return "None run (evaluation.lm_eval.tasks is empty)."
    return "\n".join(f"- {task} {metric}: {benchmarks['base'].get(task, {}).get(metric)} (base) -> {value} (merged candidate)"
                     for task, metrics in benchmarks["candidate"].items() for metric, value in metrics.items())


APPROVAL_PLACEHOLDER = ("Recorded in the registry's audit log, not in this file (a registered version's files never change): "
                        "`ftpipe registry card MODEL VERSION` renders this card with the decisions, and `ftpipe registry verify "
                        "MODEL` checks them.")
MONITORING_PLACEHOLDER = ("Monitoring history: in the registry's audit log (`ftpipe registry card MODEL VERSION` renders it "
                          "here; `ftpipe monitor MODEL` runs a check).")


def _monitoring_lines(monitoring: dict | None) -> str:
    """The plan the version was registered with: what is sent, what is read, what breaches."""
    if not monitoring:
        return "No monitoring section in this version's recipe (registered before ftpipe monitored outputs)."
    endpoint = monitoring.get("endpoint") or {}
    thresholds = "; ".join(f"{t['metric']} {'>=' if t.get('min') is not None else '<='} "
                           f"{t['min'] if t.get('min') is not None else t['max']:g}" for t in monitoring["thresholds"]) or "none"
    return "\n".join([
        f"- every {monitoring['every']} (`ftpipe serve --monitor MODEL`), against {endpoint.get('base_url') or 'the endpoint the run names'}",
        f"- canary suite: {monitoring['canary_rows']} held-out rows{' and the red-team probes' if monitoring['canary_probes'] else ''} "
        "(canary.jsonl), scored as at evaluation",
        f"- traffic: {monitoring.get('traffic') or 'the files the run names'}; refusals, PII the request did not hold, injection "
        "canaries, JSON validity, cut-off answers, length, latency, task metrics where references exist",
        f"- thresholds: {thresholds}",
        f"- drift: a metric whose {monitoring['confidence']:g} interval lies worse than at evaluation by more than "
        f"{monitoring['drift_tolerance']:g}",
        "- a breach emits the Prefect event ftpipe.monitoring.breach, is recorded in the audit log and, where the model's "
        "policy says so (`ftpipe registry policy --rollback-on-breach`), moves production back to the previous version",
    ])
