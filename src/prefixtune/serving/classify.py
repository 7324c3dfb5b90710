"""POST /v1/classify: label probabilities per input, from a classification base model and its prefixes.

Not an OpenAI endpoint; it follows their conventions (a `model` field naming the prefix, a list of
`data`, `usage`) and reports labels by the names in the base model's config (id2label).
"""

from __future__ import annotations

import asyncio

from fastapi import Request

from prefixtune.serving.errors import RequestError
from prefixtune.serving.schemas import ClassifyRequest
from prefixtune.serving.server import PrefixServer
from prefixtune.serving.work import Sink, Work


async def classify(srv: PrefixServer, request: Request, body: ClassifyRequest) -> dict:
    prefix = await srv.lookup(body.model, "classify")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise RequestError(400, "input is empty")
    ids = await asyncio.to_thread(srv.encode, texts)
    work = Work("classify", prefix, ids, Sink(asyncio.get_running_loop(), 4))
    transcript = srv.submit(work, prefix)
    await transcript.wait(request)
    id2label = getattr(srv.bank.base_model.config, "id2label", None) or {}
    data = []
    for i, probs in enumerate(transcript.result):
        labels = [str(id2label.get(j, id2label.get(str(j), f"LABEL_{j}"))) for j in range(len(probs))]
        best = max(range(len(probs)), key=probs.__getitem__)
        data.append({"index": i, "label": labels[best], "probabilities": dict(zip(labels, probs, strict=True))})
    tokens = sum(len(p) for p in ids)
    return {
        "object": "list",
        "model": body.model,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
