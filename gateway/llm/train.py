"""The deterministic recipe behind gateway/examples/tinygpt.onnx.

A byte-level GPT (2 layers, width 64, 4 heads, context 128; about 141k parameters) trained
for 300 steps on the text of the stdlib's ``pydoc_data/topics.py``. Its text is poor; what
matters is that it is a real autoregressive model that reproduces bit for bit: fixed seeds,
one thread (float sums reorder with the thread count), a pinned torch, a corpus whose
SHA-256 is checked (the file changes between Python releases), and kernels pinned to the
portable code paths (`PINNED_ENV`): torch and MKL otherwise pick kernels by CPU (AVX2,
AVX-512, AMX), whose sums round differently, so the same recipe made other bytes on
another machine. `build()` runs the recipe in a child process with that environment,
because both libraries read it once, at load. Run::

    python -m gateway.llm.train gateway/examples/tinygpt.onnx

The ONNX graph takes ``input_ids`` INT64 [batch, sequence] (sequence <= CONTEXT) and gives
``logits`` FP32 [batch, VOCAB] for the next token after the last position.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import cast

import torch
from torch import nn

from gateway.llm.tokenizer import VOCAB

LAYERS = 2
WIDTH = 64
HEADS = 4
CONTEXT = 128
STEPS = 300
BATCH = 32
LEARNING_RATE = 3e-3
SEED = 20261202
# pydoc_data/topics.py of CPython 3.11.7, the interpreter this project pins.
CORPUS_SHA256 = "abaa56a64551d8eead1b19cbae3c6db443f99f0cab81df07bed3cb75c0db9346"


class RecipeError(RuntimeError):
    """The recipe cannot reproduce the shipped model here (another corpus or torch)."""


class Block(nn.Module):
    def __init__(self, width: int = WIDTH, heads: int = HEADS) -> None:
        super().__init__()
        self.width, self.heads = width, heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.mask: torch.Tensor
        self.register_buffer(
            "mask", torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        width, heads = self.width, self.heads
        q, k, v = self.qkv(self.ln1(x)).split(width, dim=2)
        # (b, t, width) -> (b, heads, t, head width); plain ops export to opset 17 cleanly.
        q, k, v = (z.reshape(b, t, heads, width // heads).transpose(1, 2) for z in (q, k, v))
        att = q @ k.transpose(2, 3) / math.sqrt(width // heads) + self.mask[:t, :t]
        y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, width)
        x = x + self.proj(y)
        return cast(torch.Tensor, x + self.mlp(self.ln2(x)))


class TinyGPT(nn.Module):
    def __init__(self, layers: int = LAYERS, width: int = WIDTH, heads: int = HEADS) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, width)
        self.pos = nn.Embedding(CONTEXT, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits at every position, [batch, sequence, VOCAB]."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(positions)
        return cast(torch.Tensor, self.head(self.ln(self.blocks(x))))


class NextToken(nn.Module):
    """What is exported: logits of the token after the last position only."""

    def __init__(self, gpt: TinyGPT) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.gpt(input_ids)[:, -1, :])


def corpus() -> bytes:
    spec = importlib.util.find_spec("pydoc_data.topics")
    if spec is None or spec.origin is None:
        raise RecipeError("the stdlib's pydoc_data.topics is missing")
    data = Path(spec.origin).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != CORPUS_SHA256:
        raise RecipeError(
            f"pydoc_data/topics.py has sha256 {digest}, the recipe needs {CORPUS_SHA256}"
        )
    return data


def train(
    steps: int = STEPS,
    *,
    layers: int = LAYERS,
    width: int = WIDTH,
    heads: int = HEADS,
    seed: int = SEED,
) -> TinyGPT:
    """The recipe; other sizes, seeds and step counts make other (test) models, such as
    the smaller substitute a lying node serves in tests/test_llm_verify.py."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    data = torch.tensor(list(corpus()), dtype=torch.long)
    model = TinyGPT(layers, width, heads)
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    batches = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - CONTEXT - 1, (BATCH,), generator=batches)
        x = torch.stack([data[s : s + CONTEXT] for s in starts.tolist()])
        y = torch.stack([data[s + 1 : s + CONTEXT + 1] for s in starts.tolist()])
        loss = nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    return model.eval()


def export(model: TinyGPT) -> bytes:
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            NextToken(model),
            (torch.zeros((1, 8), dtype=torch.long),),
            buf,  # type: ignore[arg-type]  # a file object works, the stub says path only
            dynamo=False,  # the dynamo exporter needs onnxscript, which is not installed
            opset_version=17,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}},
        )
    return buf.getvalue()


# The same kernels on every x86 CPU: ATen's unvectorised dispatch, MKL's conditional
# numerical reproducibility on its compatible path, oneDNN at its lowest ISA, one thread.
PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def _pinned() -> bool:
    return all(os.environ.get(k) == v for k, v in PINNED_ENV.items())


def build() -> bytes:
    """The ONNX bytes of the recipe's model, made in a child with the pinned kernels."""
    with tempfile.TemporaryDirectory(prefix="ztgate-tinygpt-") as tmp:
        out = Path(tmp) / "tinygpt.onnx"
        subprocess.run(
            [sys.executable, "-m", "gateway.llm.train", str(out)],
            env={**os.environ, **PINNED_ENV},
            check=True,
            capture_output=True,
            timeout=900,
        )
        return out.read_bytes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where to write the ONNX file")
    args = parser.parse_args(argv)
    if _pinned():
        torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # a module flag
        data = export(train())
    else:
        data = build()
    args.out.write_bytes(data)
    print(f"{args.out}: sha256 {hashlib.sha256(data).hexdigest()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
