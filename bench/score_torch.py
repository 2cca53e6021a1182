"""PyTorch + transformers anchor for bench/score.py: the same weights, the same tokens.

Runs under a separate interpreter that has torch (never the project venv):

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 transformers gguf accelerate
    .venv/bin/python bench/score.py --torch-python /tmp/torchvenv/bin/python

Reads ``{"gguf": path, "seqs": [[token ids], ...]}`` on stdin (the exact sequences the MLX
rows score), loads the same GGUF through transformers (dequantized to fp32), and scores the
sequences the way a plain reward model does: length-sorted right-padded batches of 8, the
final hidden state at each sequence's last token through a linear head. Prints
``{"rate": tokens/s, "tokens": n}``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModel


def main() -> None:
    job = json.load(sys.stdin)
    gguf = Path(job["gguf"])
    seqs = sorted((list(s) for s in job["seqs"]), key=len)
    torch.set_num_threads(int(job.get("threads", 2)))
    model = AutoModel.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32
    )
    model.eval()
    head = torch.nn.Linear(model.config.hidden_size, 1)
    n_tok = sum(len(s) for s in seqs)

    def run() -> None:
        with torch.inference_mode():
            for i in range(0, len(seqs), 8):
                chunk = seqs[i : i + 8]
                width = max(map(len, chunk))
                ids = torch.zeros((len(chunk), width), dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for k, s in enumerate(chunk):
                    ids[k, : len(s)] = torch.tensor(s)
                    mask[k, : len(s)] = 1
                h = model(input_ids=ids, attention_mask=mask).last_hidden_state
                last = mask.sum(1) - 1
                head(h[torch.arange(len(chunk)), last])

    run()  # warm-up (allocator, lazy init), as the MLX rows get
    t = time.perf_counter()
    run()
    print(json.dumps({"rate": n_tok / (time.perf_counter() - t), "tokens": n_tok}))


if __name__ == "__main__":
    main()
