"""The baseline of bench/train_throughput.py: a plain training script with trl + peft, no ftpipe code.

    python bench/plain_trl.py SETTINGS.json

SETTINGS names the model and tokenizer folders, a JSONL of pre-tokenized examples ({input_ids, labels}) and the
trainer settings. It is what a user writes by hand: load, wrap in LoRA, SFTTrainer, train, save the adapter.
Prints one JSON line last: tokens, seconds of trainer.train(), tokens/s, the script's wall time, final loss.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

started = time.perf_counter()

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, set_seed  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402


class CpuSFTTrainer(SFTTrainer):
    """trl's fused LM head runs a Triton kernel, which a CUDA build of torch cannot run without a GPU: off GPU
    the loss is computed the plain transformers way (what any CPU user of trl 1.x must do)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if inputs["input_ids"].device.type == "cuda":
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


def main(settings_path: str) -> None:
    s = json.loads(Path(settings_path).read_text())
    set_seed(s["seed"])
    on_gpu = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(s["tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(s["model"], dtype=torch.bfloat16 if on_gpu else torch.float32,
                                                 device_map={"": "cuda:0"} if on_gpu else None)
    model = get_peft_model(model, LoraConfig(r=s["r"], lora_alpha=s["alpha"], lora_dropout=0.0, target_modules=s["target_modules"],
                                             bias="none", task_type="CAUSAL_LM"))
    rows = [json.loads(line) for line in Path(s["examples"]).read_text().splitlines()]
    config = SFTConfig(output_dir=s["output_dir"], num_train_epochs=s["epochs"], max_steps=s.get("max_steps") or -1,
                       per_device_train_batch_size=s["batch_size"], learning_rate=s["learning_rate"], lr_scheduler_type="linear",
                       max_length=s["max_seq_length"], seed=s["seed"], data_seed=s["seed"], logging_steps=s["logging_steps"],
                       save_strategy="steps", save_steps=s["save_steps"], save_total_limit=2, report_to=[], use_cpu=not on_gpu,
                       bf16=on_gpu, disable_tqdm=True, packing=s["packing"])
    trainer = CpuSFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    train_started = time.perf_counter()
    output = trainer.train()
    runtime = time.perf_counter() - train_started
    model.save_pretrained(Path(s["output_dir"]) / "adapter")
    tokens = sum(len(row["input_ids"]) for row in rows) * trainer.state.epoch  # every row, once an epoch
    print(json.dumps({"tokens": int(tokens), "train_s": round(runtime, 3), "tokens_per_s": round(tokens / runtime, 1),
                      "wall_s": round(time.perf_counter() - started, 3), "steps": trainer.state.global_step,
                      "train_loss": round(output.training_loss, 5)}))


if __name__ == "__main__":
    main(sys.argv[1])
