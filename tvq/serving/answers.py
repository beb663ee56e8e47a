"""The answers of `tvq serve` (docs/DESIGN.md section 13): the JSON of whole responses,
streamed chunks (server-sent events), usage, a choice's end and OpenAI's logprobs, with
OpenAI's token text ("bytes:\\xNN" for a token that is not whole UTF-8). The requests
they answer are tvq/serving/protocol.py's; nothing here runs the model or touches HTTP.
"""

from __future__ import annotations

import json
import secrets
import time

from tvq.serving.protocol import ApiError, CompletionRequest
from tvq.text.tokenizer import token_text

# -- answers ------------------------------------------------------------------------------


def completion_head(model_name: str, session: str | None) -> dict:
    """The fields every answer and every chunk of one completion share."""
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
            "created": int(time.time()), "model": model_name}  # fmt: skip
    if session is not None:
        head["session"] = session  # an extension
    return head


def completion_response(head: dict, texts: list[str], choices: list[dict], usage: dict) -> dict:
    """A whole (not streamed) answer: each choice's text with its end (`choice_end`)."""
    out = [{"text": texts[i], "index": i, **choices[i]} for i in range(len(texts))]
    return head | {"choices": out, "usage": usage}


def usage_json(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage, with prompt_tokens_details.cached_tokens: the prompt tokens the
    state cache held (not read again)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}  # fmt: skip


def models_json(model_name: str, created: int) -> dict:
    """GET /v1/models: the one model served."""
    return {"object": "list", "data": [
        {"id": model_name, "object": "model", "created": created, "owned_by": "tvq"}
    ]}  # fmt: skip


def session_deleted_json(name: str) -> dict:
    """DELETE /v1/sessions/{id} (an extension)."""
    return {"id": name, "object": "session", "deleted": True}


# Server-sent events: a chunk per piece of text, a last chunk per choice with its
# finish_reason (and logprobs), the usage when asked, then [DONE]; an error instead.

SSE_DONE = "data: [DONE]\n\n"


def sse_chunk(head: dict, payload: dict) -> str:
    return f"data: {json.dumps(head | payload, ensure_ascii=False)}\n\n"


def sse_error(error: ApiError) -> str:
    return f"data: {json.dumps(error.body())}\n\n"


def text_chunk(index: int, text: str, logprobs: dict | None = None) -> dict:
    """A streamed piece of a choice's text, with its tokens' log-probs when asked for."""
    return {"choices": [{"text": text, "index": index, "logprobs": logprobs,
                         "finish_reason": None}]}  # fmt: skip


def end_chunk(index: int, choice: dict) -> dict:
    return {"choices": [{"text": "", "index": index, **choice}]}


def usage_chunk(usage: dict) -> dict:
    return {"choices": [], "usage": usage}


# -- a choice's end and its logprobs -------------------------------------------------------


def choice_end(tokenizer, r: CompletionRequest, sample, echoed, prompt_text: str) -> dict:
    """A choice's finish_reason and logprobs (its text is sent as it is sampled); text
    offsets count from the start of the prompt. echoed: the prompt's (ids, log-probs,
    top log-probs, top ids) with echo and logprobs, else None."""
    start = 0 if r.echo else len(prompt_text)
    logprobs = None if r.logprobs is None else logprobs_json(tokenizer, sample, echoed, start)
    return {
        "finish_reason": "length" if sample.finish_reason == "length" else "stop",
        "logprobs": logprobs,
    }


def logprobs_json(tokenizer, sample, echoed, start: int) -> dict:
    """The OpenAI shape: tokens, token_logprobs, top_logprobs, text_offset; and the
    tokens' ids (token_ids, a tvq extension), of the echoed prompt (echoed: its ids,
    log-probs, top log-probs, top ids and whether a document-start marker led it) and
    the sample, text offsets from `start`. The marker is echoed as its eos_text with
    log-prob null: nothing predicts a document's start."""
    entries = []
    if echoed is not None:
        ids, lps, top_values, top_ids, fresh = echoed
        if fresh:
            entries.append((tokenizer.eos_id, None, None, tokenizer.eos_text))
        for k, (token, lp) in enumerate(zip(ids, lps, strict=True)):
            top = list(zip(top_ids[k].tolist(), top_values[k].tolist(), strict=True))
            entries.append((token, float(lp), top, None))
    entries += _sampled(sample, 0, len(sample.ids))
    return _tokens_json(tokenizer, entries, start)[0]


def logprobs_piece(tokenizer, piece, start: int) -> tuple[dict, int]:
    """The logprobs_json of a streamed Piece's tokens, text offsets from `start` → (the
    dict, the offset after them)."""
    tops = piece.top_logprobs or [[]] * len(piece.ids)
    entries = [
        (token, float(lp), top, None)
        for token, lp, top in zip(piece.ids, piece.log_probs, tops, strict=True)
    ]
    return _tokens_json(tokenizer, entries, start)


def _sampled(sample, begin: int, end: int) -> list[tuple]:
    tops = sample.top_logprobs or [[]] * len(sample.ids)
    return [(sample.ids[k], float(sample.log_probs[k]), tops[k], None) for k in range(begin, end)]


def _tokens_json(tokenizer, entries: list[tuple], start: int) -> tuple[dict, int]:
    """entries (token, log-prob or None, top [(id, log-prob)] or None, text or None) →
    (OpenAI's logprobs object, the text offset after them)."""
    offsets, at = [], start
    for token, _, _, text in entries:
        offsets.append(at)
        at += len(text if text is not None else token_text(tokenizer, token))
    return {
        "tokens": [
            text if text is not None else openai_token_text(tokenizer, token)
            for token, _, _, text in entries
        ],  # fmt: skip
        "token_logprobs": [None if v is None else round(v, 6) for _, v, _, _ in entries],
        "top_logprobs": [
            None if top is None else {openai_token_text(tokenizer, i): round(v, 6) for i, v in top}
            for _, _, top, _ in entries
        ],
        "text_offset": offsets,
        "token_ids": [int(token) for token, _, _, _ in entries],  # a tvq extension
    }, at


def openai_token_text(tokenizer, token: int) -> str:
    """A token's text the OpenAI way: a token that is not whole UTF-8 as "bytes:\\xNN…"
    (unlike tvq.text.tokenizer.token_text, which puts U+FFFD in its place)."""
    data = tokenizer.token_bytes(int(token))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)
