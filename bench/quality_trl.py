"""TRL anchor for bench/quality.py: TRL's RewardTrainer on the same pairs, base and LoRA placement.

Runs under the separate interpreter bench/quality.py creates (torch CPU, transformers, trl,
peft, gguf; never the project venv, never imports palate). Reads a job JSON on stdin::

    {"gguf": path, "train": [[prompt, chosen, rejected], ...], "test": [...], "max_tokens": 384,
     "layers": 8, "rank": 8, "lr": 5e-4, "epochs": 1, "batch_size": 8, "threads": 2}

loads the base from the same GGUF (dequantized to fp32 by transformers) as a sequence
classifier with one label, puts LoRA (all seven projections, as Palate) on the top ``layers``
blocks with rank ``rank`` and alpha 2 x rank, and trains it with RewardTrainer for ``epochs``
(length-grouped batches, no gradient checkpointing, no LoRA dropout). Prompts are cut from the left
to fit ``max_tokens`` as Palate does (RewardTrainer would drop the pair instead). Prints one
JSON line: ``{"train_s", "load_s", "score_s", "chosen": [...], "rejected": [...],
"train_pairs", "peak_rss_kb"}`` with the test pairs' scores; the caller computes accuracy
with Palate's own evaluator, so both sides are judged by the same code.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def length_grouped(rows: list[dict[str, list[int]]], batch_size: int) -> list[dict[str, list[int]]]:
    """Rows in transformers' length-grouped order, fixed by seed 0: shuffled, then each
    megabatch of 50 batches sorted longest first (what LengthGroupedSampler does; its own
    sampler needs an ``input_ids`` column that a preference dataset does not have)."""
    import random

    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    mega = 50 * batch_size
    out = []
    for i in range(0, len(order), mega):
        chunk = order[i : i + mega]
        chunk.sort(key=lambda j: -max(len(rows[j]["chosen_ids"]), len(rows[j]["rejected_ids"])))
        out.extend(rows[j] for j in chunk)
    return out


def main() -> None:
    job = json.load(sys.stdin)
    import torch

    torch.set_num_threads(int(job.get("threads", 2)))
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    gguf = Path(job["gguf"])
    t0 = time.monotonic()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, num_labels=1, dtype=torch.float32
    )
    # transformers dequantizes a GGUF to plain fp32 tensors on load but still flags the model
    # as "GGUF-quantized", which Trainer refuses to train: the weights are fp32, drop the flag.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    assert all(p.dtype == torch.float32 for p in model.parameters())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    load_s = time.monotonic() - t0
    n_layers = model.config.num_hidden_layers
    max_tokens = int(job["max_tokens"])

    def ids(prompt: str, response: str) -> list[int]:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        r = r[:max_tokens]
        return (p[-(max_tokens - len(r)) :] if max_tokens > len(r) else []) + r

    rows = [{"chosen_ids": ids(p, c), "rejected_ids": ids(p, r)} for p, c, r in job["train"]]
    rows = length_grouped(rows, int(job["batch_size"]))
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=int(job["rank"]),
        lora_alpha=2 * int(job["rank"]),
        lora_dropout=0.0,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        layers_to_transform=list(range(n_layers - int(job["layers"]), n_layers)),
    )
    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(
            output_dir=out,
            per_device_train_batch_size=int(job["batch_size"]),
            num_train_epochs=float(job["epochs"]),
            learning_rate=float(job["lr"]),
            max_length=None,  # already cut to max_tokens above
            gradient_checkpointing=False,
            train_sampling_strategy="sequential",  # rows are length-grouped above
            report_to=[],
            logging_steps=10,
            save_strategy="no",
            eval_strategy="no",
            use_cpu=True,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            peft_config=lora,
        )
        t1 = time.monotonic()
        trainer.train()
        train_s = time.monotonic() - t1
        trained = trainer.model
    trained.eval()
    t2 = time.monotonic()
    chosen, rejected = [], []
    with torch.no_grad():
        for p, c, r in job["test"]:
            for text, sink in ((c, chosen), (r, rejected)):
                x = torch.tensor([ids(p, text)])
                sink.append(float(trained(input_ids=x).logits[0, 0]))
    print(
        json.dumps(
            {
                "train_s": train_s,
                "load_s": load_s,
                "score_s": time.monotonic() - t2,
                "train_pairs": len(rows),
                "chosen": chosen,
                "rejected": rejected,
                "pid": os.getpid(),
                # kB on Linux: this process's peak, the anchor's "peak RSS"
                "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            }
        )
    )


if __name__ == "__main__":
    main()
