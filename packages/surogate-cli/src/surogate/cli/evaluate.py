"""Evaluation: loss over the validation rows, and exact-match accuracy of greedy answers to held-out chat prompts.

eval loss = sum of token cross-entropies / number of trained tokens, over whole validation rows (packed like the
training rows, so documents are masked from each other the same way).
Exact match: each prompt (the conversation without its last assistant turn, plus the template's generation
prompt) is extended one greedy token at a time until an end-of-turn token or max_new_tokens; the answer matches
when it equals the reference after stripping surrounding whitespace. Prompts run in batches, right-padded: a
causal model's logits at a row's last real token do not depend on the padding after it. No KV cache: every new
token reruns the batch (fine for the small models and short answers this is for).
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def eval_loss(model, shard, *, batch_size: int, max_batches: int, device) -> tuple[float, int]:
    """-> (mean loss over trained tokens, number of trained tokens)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    n_batches = -(-shard.n_rows // batch_size)
    if max_batches > 0:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        rows = slice(b * batch_size, min(shard.n_rows, (b + 1) * batch_size))
        ids, labels, pos = (torch.from_numpy(np.asarray(a[rows], dtype=np.int64)).to(device)
                            for a in (shard.input_ids, shard.labels, shard.position_ids))
        loss_sum, n_valid = model.loss_sum(ids, labels, pos)
        total += loss_sum.double()
        count += int(n_valid)
    model.train(was_training)
    return (total.item() / count if count else float("nan")), count


@torch.no_grad()
def exact_match(model, tokenizer, prompts: list[dict], *, max_new_tokens: int, device, batch_size: int = 64
                ) -> tuple[float, list[tuple[str, str, str]]]:
    """-> (accuracy, [(prompt's last user turn, answer, reference)] for every prompt)."""
    was_training = model.training
    model.eval()
    stop = torch.tensor(sorted(tokenizer.stop_ids()), device=device)
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        encoded = [tokenizer.encode_prompt(p["messages"]) for p in chunk]
        lengths = torch.tensor([len(e) for e in encoded], device=device)
        width = int(lengths.max()) + max_new_tokens
        ids = torch.full((len(chunk), width), tokenizer.pad_id, dtype=torch.int64, device=device)
        for i, e in enumerate(encoded):
            ids[i, :len(e)] = torch.tensor(e, dtype=torch.int64)
        done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        cursor = lengths.clone()
        rows = torch.arange(len(chunk), device=device)
        for _ in range(max_new_tokens):
            span = int(cursor.max())
            logits = model(ids[:, :span])
            nxt = logits[rows, cursor - 1].argmax(-1)
            finished = torch.isin(nxt, stop)
            write = ~done & ~finished
            ids[rows[write], cursor[write]] = nxt[write]
            cursor = torch.where(write, cursor + 1, cursor)
            done |= finished
            if bool(done.all()):
                break
        for i, p in enumerate(chunk):
            answer = tokenizer.decode(ids[i, lengths[i]:cursor[i]].tolist(), skip_special_tokens=True)
            question = next((m["content"] for m in reversed(p["messages"]) if m["role"] == "user"), "")
            results.append((question, answer, p["answer"]))
    model.train(was_training)
    correct = sum(a.strip() == ref.strip() for _, a, ref in results)
    return (correct / len(results) if results else float("nan")), results
