"""`ztgate demo`'s generative scene: one chat completion streamed from tinygpt through the
OpenAI-compatible route, its opening and closing receipt ids printed."""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path
from typing import Any

import httpx

MODEL = "tinygpt"
CALLER = "demo"  # apps may generate on public models within the token caps (policies/)


def generative_scene(pki_dir: Path, port: int) -> int:
    """Stream one answer; returns the number of failures (0 or 1)."""
    ctx = ssl.create_default_context(cafile=str(pki_dir / "root" / "ca.crt"))
    client_dir = pki_dir / "clients" / CALLER
    ctx.load_cert_chain(client_dir / "client.crt", client_dir / "client.key")
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "The with statement"}],
        "max_tokens": 24,
        "temperature": 0.8,  # sampled with a seed the gateway picks and receipts
        "stream": True,
    }
    text: list[str] = []
    first: dict[str, Any] = {}
    last: dict[str, Any] = {}
    start = time.monotonic()
    ttft = None
    url = f"https://127.0.0.1:{port}/v1/chat/completions"
    with (
        httpx.Client(verify=ctx, timeout=60) as client,
        client.stream("POST", url, json=body) as r,
    ):
        if r.status_code != 200:
            r.read()
            print(f"[generate ] {CALLER}/{MODEL}: not served: {r.status_code} {r.text[:300]}")
            return 1
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                print(f"[generate ] {CALLER}/{MODEL}: stream broke: {event['error']}")
                return 1
            if not first:
                first = event
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.monotonic() - start
                    text.append(piece)
            if "usage" in event:
                last = event
    ms = (time.monotonic() - start) * 1000
    opening = first.get("ztgate", {}).get("receipt") or {}
    closing = last.get("ztgate", {})
    usage = last.get("usage", {})
    first_ms = f"{ttft * 1000:.0f} ms to first token, " if ttft is not None else ""
    node = first.get("ztgate", {}).get("node")
    print(
        f"[generate ] {CALLER}/{MODEL} -> {''.join(text)!r}  node={node}"
        f"  {usage.get('completion_tokens')} tokens ({closing.get('finish_reason')}), "
        f"{first_ms}{ms:.0f} ms"
    )
    print(f"            opening receipt {opening.get('id')}")
    print(f"            closing receipt {closing.get('receipt_id')}")
    ok = bool(opening.get("id")) and bool(closing.get("receipt_id"))
    return 0 if ok else 1
