"""The recipe schema: every option of every stage, with its default, description and validation.

Defaults live here and nowhere else. Every section forbids unknown keys, so a typo is an error rather
than a silently ignored setting. Each stage receives only its own section.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SAMPLE_DATA_DIR = Path(__file__).resolve().parent / "data"
TINY_PREFIX = "tiny:"
TINY_FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3")

# Metrics the evaluation stage produces, and whether a higher value is better.
METRICS: dict[str, bool] = {"exact_match": True, "eval_loss": False, "preference_accuracy": True, "preference_margin": True}
# Metrics computed only on preference eval rows (training.method: dpo).
PREFERENCE_METRICS = ("preference_accuracy", "preference_margin")


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    base: str = Field(
        "tiny:llama",
        description="Base model: a hub id (e.g. meta-llama/Llama-3.2-1B-Instruct), a local folder, or "
        "tiny:llama | tiny:mistral | tiny:mixtral | tiny:qwen2 | tiny:qwen3 for a small random model built locally.",
    )
    revision: str | None = Field(
        None, description="Hub revision (commit, tag or branch) to pin; recorded in the artifact's lineage."
    )
    chat_template: str | None = Field(
        None,
        description="Chat template override: a path to a .jinja file or the template text. "
        "Default: the tokenizer's own template, else the family's.",
    )
    trust_remote_code: bool = Field(False, description="Run model code from the hub repo. Leave off unless you trust it.")

    @model_validator(mode="after")
    def _tiny_family_known(self) -> "ModelSection":
        if self.base.startswith(TINY_PREFIX) and self.base[len(TINY_PREFIX):] not in TINY_FAMILIES:
            raise ValueError(
                f"unknown tiny model {self.base!r}; use one of " + ", ".join(TINY_PREFIX + f for f in TINY_FAMILIES)
            )
        return self


FORMATS = ("auto", "chat", "sharegpt", "alpaca", "completion", "text", "preference")
PII_TYPES = ("email", "phone", "credit_card", "iban", "ip_address", "secret")


class DataSource(Section):
    path: str | None = Field(
        None,
        description="A file, glob, folder, `save_to_disk` dataset folder or fsspec URL (s3://, gs://, az://, https://, "
        "memory://) of JSONL, JSON, CSV or Parquet. Relative paths are read from the recipe's folder.",
    )
    hub: str | None = Field(None, description="A hub dataset id, loaded with datasets.load_dataset (pin `revision`).")
    revision: str | None = Field(None, description="Hub dataset revision (commit or tag) to pin.")
    split: str = Field("train", description="Hub dataset split.")
    format: Literal[FORMATS] = Field(  # type: ignore[valid-type]
        "auto",
        description="Row format: chat ({messages}), sharegpt ({conversations: [{from, value}]}), alpaca "
        "({instruction, input, output}), completion ({prompt, completion}), text ({text}, continued pre-training), "
        "preference ({prompt, chosen, rejected}, for DPO); auto detects it per row.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename source columns before format detection, e.g. {question: prompt, answer: completion}."
    )
    weight: float = Field(1.0, gt=0, description="Mixing weight: each row is kept weight times (2 = every row twice, 0.5 = a "
                          "deterministic half).")
    max_samples: int | None = Field(None, gt=0, description="Read at most this many valid rows from this source.")
    credentials_block: str | None = Field(
        None, description="Name of a Prefect Secret block holding fsspec storage options (JSON) for a remote path."
    )

    @model_validator(mode="after")
    def _path_or_hub(self) -> "DataSource":
        if (self.path is None) == (self.hub is None):
            raise ValueError("a source needs exactly one of path or hub")
        return self

    @property
    def name(self) -> str:
        return self.path if self.path is not None else f"hub:{self.hub}"


def _sample_sources() -> list[DataSource]:
    return [DataSource(path=str(SAMPLE_DATA_DIR / "support_tickets_train.jsonl"))]


class DedupSection(Section):
    exact: bool = Field(True, description="Drop rows whose normalised content repeats an earlier row.")
    near: bool = Field(True, description="Drop near-duplicates found by MinHash LSH (datasketch).")
    threshold: float = Field(0.8, gt=0, lt=1, description="Estimated Jaccard similarity of word 3-grams above which rows are near-duplicates.")
    num_perm: int = Field(64, ge=16, le=512, description="MinHash permutations: more is more exact and slower.")


class PIISection(Section):
    redact: bool = Field(True, description="Replace personal data and secrets in training text with typed placeholders.")
    types: list[Literal[PII_TYPES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(PII_TYPES), description="Which detectors run: " + ", ".join(PII_TYPES)
    )


class ContaminationSection(Section):
    check: bool = Field(True, description="Look for evaluation prompts whose n-grams appear in training rows.")
    ngram: int = Field(8, ge=3, le=50, description="Word n-gram length compared.")
    min_overlap: float = Field(0.5, gt=0, le=1, description="Share of an eval prompt's n-grams found in one training row that counts as contamination.")
    remove: bool = Field(False, description="Remove contaminated training rows (otherwise only report them).")
    max_eval_rows: int = Field(10_000, gt=0, description="Eval rows indexed for the check (bounds memory).")


class DataSection(Section):
    sources: list[DataSource] = Field(
        default_factory=_sample_sources, min_length=1, description="Training data (default: the shipped support-ticket sample)."
    )
    eval_sources: list[DataSource] = Field(
        default_factory=list,
        description="Held-out evaluation data. When empty, eval_fraction of the sources is split off instead.",
    )
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of rows held out for evaluation when there are no eval_sources.")
    seed: int = Field(42, description="Seed of the deterministic split and of weighted down-sampling.")
    system_prompt: str | None = Field(None, description="System message for chat rows (see system_prompt_mode).")
    system_prompt_mode: Literal["add", "replace"] = Field(
        "add", description="add: only to rows without a system message; replace: every row gets this one."
    )
    max_invalid_fraction: float = Field(
        0.05, ge=0, le=1, description="Fail the stage when more than this share of rows is quarantined."
    )
    max_row_chars: int = Field(200_000, gt=0, description="Quarantine rows with more characters than this (a runaway string).")
    min_tokens: int = Field(1, ge=1, description="Drop rows shorter than this many tokens (model tokenizer, chat template applied).")
    max_tokens: int | None = Field(
        None, gt=0, description="Rows longer than this many tokens (default: training.max_seq_length) are handled per `overlong`."
    )
    overlong: Literal["drop", "truncate"] = Field(
        "drop", description="drop: remove over-long rows (listed in the report); truncate: keep them, cut at max_tokens in training."
    )
    dedup: DedupSection = Field(default_factory=DedupSection)
    pii: PIISection = Field(default_factory=PIISection)
    contamination: ContaminationSection = Field(default_factory=ContaminationSection)
    workers: int = Field(2, ge=1, le=64, description="Processes that parse, clean and hash rows in parallel.")


class LoraSection(Section):
    r: int = Field(16, gt=0, le=512, description="LoRA rank. Higher adds capacity and memory; vLLM serves ranks up to 512.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input. 0 lets unsloth use its fast path.")
    target_modules: Literal["attention", "all-linear", "experts"] | list[str] = Field(
        "all-linear",
        description="Which layers get adapters: a preset resolved by the model family (attention | all-linear | "
        "experts: a mixture-of-experts model's expert weights besides attention), or explicit module names.",
    )
    use_dora: bool = Field(False, description="DoRA (weight-decomposed LoRA). vLLM does not serve DoRA adapters: export ships the merged model.")
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha / sqrt(r), which keeps high ranks stable. Served by vLLM.")
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head). vLLM does not serve "
        "such adapters: export ships the merged model.",
    )


class QuantizationSection(Section):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the QLoRA base (bitsandbytes).")
    double_quant: bool = Field(True, description="Quantise the quantisation constants too (saves ~0.4 bits a weight).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype the 4-bit layers compute in; auto: bfloat16 on GPUs that have it, float16 on others, float32 on CPU."
    )


class DpoSection(Section):
    beta: float = Field(0.1, gt=0, description="How far the policy may move from the reference (the base with the adapter "
                        "off): lower lets it move further.")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="trl's DPO loss: sigmoid (the DPO paper), ipo, hinge (SLiC) or robust (noisy labels)."
    )


STRATEGIES = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")


class DistributedSection(Section):
    num_processes: int = Field(1, ge=1, le=1024, description="Training processes launched through accelerate: one per GPU "
                               "(without GPUs, CPU processes talking over gloo). 1 trains in a single process.")
    strategy: Literal[STRATEGIES] = Field(  # type: ignore[valid-type]
        "ddp", description="ddp: a full copy of the model per process; fsdp: parameters sharded (PyTorch FSDP); "
        "deepspeed_zero2 / deepspeed_zero3: DeepSpeed ZeRO (needs the deepspeed package). fsdp and deepspeed need GPUs."
    )


class TrainingSection(Section):
    method: Literal["sft", "dpo"] = Field(
        "sft", description="sft: supervised fine-tuning (chat rows) and continued pre-training (text rows); "
        "dpo: direct preference optimisation on preference rows ({prompt, chosen, rejected}), with trl's DPOTrainer."
    )
    dpo: DpoSection = Field(default_factory=DpoSection, description="Options of method: dpo.")
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    loss_on: Literal["assistant", "all"] = Field(
        "assistant", description="Which tokens of a chat row carry the loss: assistant turns only, or the whole conversation. Text rows always train on all."
    )
    adapter: Literal["lora", "qlora"] = Field(
        "lora", description="lora: 16/32-bit base + LoRA; qlora: base loaded in 4-bit nf4 (bitsandbytes) + LoRA."
    )
    backend: Literal["auto", "unsloth", "hf"] = Field(
        "auto", description="unsloth (FastLanguageModel), hf (transformers + peft), or auto: unsloth when it imports."
    )
    lora: LoraSection = Field(default_factory=LoraSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection, description="The 4-bit base of adapter: qlora.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training rows (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps; overrides epochs.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate of the adapter weights.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of steps spent warming the learning rate up.")
    batch_size: int = Field(8, gt=0, description="Rows per device per step. Higher is faster and uses more memory.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches summed per optimizer step.")
    max_seq_length: int = Field(2048, gt=0, description="Longest row in tokens; longer rows are quarantined, never cut silently.")
    packing: bool = Field(False, description="Pack several rows into one sequence (padding-free, no attention across rows).")
    seed: int = Field(42, description="Seed for adapter initialisation and data order.")
    logging_steps: int = Field(10, gt=0, description="Log loss every N steps.")
    save_steps: int = Field(100, gt=0, description="Checkpoint every N optimizer steps; a rerun resumes from the latest.")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept (the newest ones).")
    min_trained_token_fraction: float = Field(
        0.01, ge=0, le=1, description="Fail when fewer than this share of non-pad tokens carry a loss (masking gone wrong)."
    )
    max_trained_token_fraction: float = Field(
        0.9, ge=0, le=1, description="Fail when more than this share of non-pad tokens carry a loss (prompts trained on)."
    )

    @model_validator(mode="after")
    def _fraction_bounds_ordered(self) -> "TrainingSection":
        if self.min_trained_token_fraction >= self.max_trained_token_fraction:
            raise ValueError("min_trained_token_fraction must be below max_trained_token_fraction")
        return self

    @model_validator(mode="after")
    def _method_takes_options(self) -> "TrainingSection":
        if self.method == "dpo" and self.packing:
            raise ValueError("packing is not available with method: dpo (trl pads chosen and rejected answers); set packing: false")
        if self.method == "dpo" and self.loss_on != "assistant":
            raise ValueError("loss_on applies to method: sft; dpo scores the chosen and rejected answers only")
        if self.method == "dpo" and "lm_head" in self.lora.modules_to_save + _explicit(self.lora.target_modules):
            raise ValueError("lora: lm_head cannot be trained with method: dpo (trl computes log-probabilities from "
                             "lm_head.weight directly, so an adapter or a trained copy there would be ignored)")
        return self

    @model_validator(mode="after")
    def _backend_can_run_it(self) -> "TrainingSection":
        if self.backend == "unsloth" and (reasons := unsloth_cannot_run(self)):
            raise ValueError(f"backend unsloth cannot run this recipe ({'; '.join(reasons)}); use backend: hf or auto")
        return self


def _explicit(target_modules: str | list[str]) -> list[str]:
    return [] if isinstance(target_modules, str) else target_modules


def unsloth_cannot_run(training: TrainingSection) -> list[str]:
    """What in a training section unsloth's loader does not support (auto then picks hf)."""
    quantization = training.quantization
    reasons = []
    if training.adapter == "qlora" and quantization.quant_type != "nf4":
        reasons.append(f"quantization.quant_type={quantization.quant_type}: unsloth loads 4-bit bases as nf4")
    if training.adapter == "qlora" and not quantization.double_quant:
        reasons.append("quantization.double_quant=false: unsloth always double-quantises")
    if training.distributed.num_processes > 1 and training.distributed.strategy != "ddp":
        reasons.append(f"distributed.strategy={training.distributed.strategy}: unsloth's supported multi-GPU path is DDP")
    return reasons


class Gate(Section):
    metric: str = Field(description="Metric name: " + ", ".join(METRICS))
    min: float | None = Field(None, description="Candidate value must be at least this.")
    max: float | None = Field(None, description="Candidate value must be at most this.")
    min_delta_vs_base: float | None = Field(None, description="Candidate minus base must be at least this.")
    max_delta_vs_base: float | None = Field(None, description="Candidate minus base must be at most this (e.g. -0.1 for loss).")

    @model_validator(mode="after")
    def _one_known_threshold(self) -> "Gate":
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; use one of: " + ", ".join(METRICS))
        set_bounds = [k for k in ("min", "max", "min_delta_vs_base", "max_delta_vs_base") if getattr(self, k) is not None]
        if len(set_bounds) != 1:
            raise ValueError(
                "a gate needs exactly one of min, max, min_delta_vs_base, max_delta_vs_base "
                f"(got {', '.join(set_bounds) or 'none'})"
            )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("min", "max", "min_delta_vs_base", "max_delta_vs_base") if getattr(self, k) is not None)

    @property
    def threshold(self) -> float:
        return getattr(self, self.kind)


class GenerationSection(Section):
    max_new_tokens: int = Field(64, gt=0, description="Longest generated answer in evaluation.")
    batch_size: int = Field(16, gt=0, description="Prompts generated together (greedy decoding).")


class EvaluationSection(Section):
    max_samples: int | None = Field(200, gt=0, description="Evaluate on at most this many held-out rows (None: all).")
    generation: GenerationSection = Field(default_factory=GenerationSection)
    gates: list[Gate] = Field(default_factory=list, description="Promotion gates; any failure stops the run before export.")


class ExportSection(Section):
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Dtype of the merged weights. vLLM serves fp32 checkpoints as fp16, so ship bf16."
    )
    merged: bool = Field(True, description="Write model/: the adapter merged into the 16-bit base.")
    adapter: bool = Field(True, description="Write adapter/: the LoRA adapter for vLLM multi-LoRA serving.")
    max_shard_size: str = Field("5GB", description="Largest safetensors shard.")
    check_prompts: int = Field(4, gt=0, description="Eval prompts used to compare the merged model with the adapter model.")
    max_model_len: int | None = Field(None, gt=0, description="vLLM --max-model-len (default: training.max_seq_length).")
    tensor_parallel_size: int = Field(1, gt=0, description="vLLM --tensor-parallel-size in the launch file.")

    @model_validator(mode="after")
    def _something_to_export(self) -> "ExportSection":
        if not (self.merged or self.adapter):
            raise ValueError("merged and adapter are both false: nothing would be exported")
        return self


class TrackingSection(Section):
    mode: Literal["disabled", "offline", "online"] = Field(
        "disabled", description="wandb mode: offline writes a local run folder you can `wandb sync` later."
    )
    project: str = Field("ftpipe", min_length=1, description="wandb project name.")


class Recipe(Section):
    name: str = Field(
        "quickstart", pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="Run and model name: lowercase letters, digits, . _ -"
    )
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    export: ExportSection = Field(default_factory=ExportSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    @model_validator(mode="after")
    def _data_and_gates_fit_the_method(self) -> "Recipe":
        """Row formats and metrics that the training method cannot use are errors now, not after data preparation."""
        dpo = self.training.method == "dpo"
        for field, sources in (("sources", self.data.sources), ("eval_sources", self.data.eval_sources)):
            for i, source in enumerate(sources):
                if source.format != "auto" and (source.format == "preference") != dpo:
                    wanted = "preference" if dpo else "a chat or text format"
                    raise ValueError(f"data.{field}[{i}].format is {source.format} but training.method={self.training.method} "
                                     f"trains on {wanted} rows")
        for i, gate in enumerate(self.evaluation.gates):
            if gate.metric in PREFERENCE_METRICS and not dpo:
                raise ValueError(f"evaluation.gates[{i}].metric {gate.metric} is measured on preference rows: "
                                 "it needs training.method: dpo")
        return self
