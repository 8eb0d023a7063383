"""The episodes of `mplus bench retention`: each one written, buried and asked, and the hits counted.

An episode writes its fact's chunk into a fresh state, then filler chunk by chunk, and at every measured
distance asks each model (apps/bench_retention.py names them); retriever recall counts the fact's rows the
question retrieves. Episodes are independent and seeded by their index, so count_hits over any split of them,
in any number of processes (in_processes), sums to the same counts.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from mplus.apps.baselines import fits_in_context, in_context_reply, same_size_memoryllm
from mplus.apps.fetch import load_mplus
from mplus.apps.retention_trials import FORMS, interference_trials, is_right, trials
from mplus.llama.tokenizer import Tokenizer
from mplus.memory.config import MemoryConfig
from mplus.memory.ltm import copies_of
from mplus.memory.mplus import MPlus


def answered(model: MPlus, tokenizer: Tokenizer, state, prompt: str, answer: str) -> bool:
    """Whether the first line of the greedy reply to `prompt` (the question as the model reads it; at most 16
    tokens, up to the model's end-of-text token or a line break) contains the answer."""
    out, task = [], model.memory_config.task
    for token in model.generate_tokens(state, tokenizer.encode(prompt), max_new_tokens=16,
                                       stop_ids=stop_ids(model, tokenizer)):
        out.append(token)
        if is_right(first_line(tokenizer, out), answer, task):  # the verdict cannot change: stop decoding
            return True
    return is_right(first_line(tokenizer, out), answer, task)


def stop_ids(model: MPlus, tokenizer: Tokenizer) -> set[int]:
    """End of text and, when one token, the line break: only the first line is scored."""
    newline = tokenizer.encode("\n")
    return set(model.config.eos_token_id) | (set(newline) if len(newline) == 1 else set())


def first_line(tokenizer: Tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids).split("\n")[0]


def recall_counts(model: MPlus, tokenizer: Tokenizer, state, prompt: str,
                  block: torch.Tensor) -> list[tuple[int, int, float]]:
    """Per layer whose LTM (+ cache) holds rows of the fact's block [L, K, d] and is scored (>= K0 rows):
    (fact rows retrieved by the question `prompt`, fact rows stored, random rate K0 / rows)."""
    record: list[dict] = []
    model.forward(state, tokenizer.encode(prompt), record=record)
    k0, out = model.memory_config.ltm_retrieved, []
    for l, r in enumerate(record):
        pool = state.ltm[l].pool("rows")  # [S + c, d]
        fact = copies_of(pool, block[l])  # [S + c]
        if len(state.ltm[l]) >= k0 and fact.any():
            picked = r["retrieved"].picks  # [K0] pool indices
            out.append((int(fact[picked].sum()), int(fact.sum()), k0 / pool.shape[0]))
    return out


def model_names(model: MPlus) -> tuple[str, ...]:
    """The curves, in table and chart order; the same-size MemoryLLM is named by its STM rows (N + K0)."""
    mem = model.memory_config
    return ("mplus", "memoryllm", f"memoryllm_n{mem.stm_size + mem.ltm_retrieved}", "in_context", "no_context")


def write_both(model: MPlus, state, big: MPlus | None, big_state, ids: list[int]) -> torch.Tensor:
    """Inject a chunk into the M+ state and write the same block into the same-size MemoryLLM's: a block
    depends only on the last K STM rows (MPlus.encode), and both STMs end with the same K rows (checked),
    so the block is computed once. Returns it, [L, K, d]."""
    k = model.memory_config.num_tokens
    if big is not None and not torch.equal(state.stm[:, -k:], big_state.stm[:, -k:]):
        raise ValueError("the two memories no longer end with the same block; inject into each separately")
    block = model.inject(state, ids, allow_short=True)  # [L, K, d]
    if big is not None:
        big.write(big_state, block, big_state.generator)
    return block


def count_hits(model: MPlus, tokenizer: Tokenizer, test: list[dict], indices, job: dict, progress: bool) -> dict:
    """Hit counts of the episodes `indices` of `test` (plain lists and numbers, summable across processes)."""
    distances, seed, skip = job["distances"], job["seed"], job["skip"]
    names = model_names(model)
    big_name, big, big_error = names[2], None, None
    if big_name not in skip:
        try:
            big = same_size_memoryllm(model)
        except ValueError as e:  # a stored memory whose LTM holds fewer than K0 rows (e.g. fresh from a Llama)
            big_error = str(e)
    hits = {m: [0] * len(distances) for m in names}
    tokens, fits = [0] * len(distances), [0] * len(distances)
    recall = [[0, 0, 0.0, 0] for _ in distances]  # retrieved, stored, sum of random rates, layer count
    by_form = {f: [0] * len(distances) for f in FORMS}
    for i in tqdm(indices, desc="retention", unit="episode", disable=not progress):
        ep = test[i]
        state = model.initial_state(seed=seed * 100_003 + i)
        big_state = big and big.initial_state(seed=seed * 100_003 + i)  # own generator: drops from N + K0 rows
        prompt = ep["prompt"]
        floor = answered(model, tokenizer, state.copy(), prompt, ep["answer"])
        block = write_both(model, state, big, big_state, tokenizer.encode(ep["paragraph"]))  # [L, K, d]
        written, c, fitting = 0, 0, "in_context" not in skip
        for j, d in enumerate(distances):
            for chunk in ep["distractors"][c:d]:
                ids = tokenizer.encode(chunk)
                write_both(model, state, big, big_state, ids)
                written += len(ids)
            c = d
            tokens[j] += written
            hits["no_context"][j] += floor
            right = answered(model, tokenizer, state, prompt, ep["answer"])
            hits["mplus"][j] += right
            by_form[ep["form"]][j] += right
            hits["memoryllm"][j] += answered(model, tokenizer, state.without_ltm(), prompt, ep["answer"])
            if big:
                hits[big_name][j] += answered(big, tokenizer, big_state, prompt, ep["answer"])
            if fitting:
                ids = tokenizer.encode(ep["context"](d))
                fitting = fits_in_context(model, len(ids)) and len(ids) <= (job["in_context_tokens"] or len(ids))
                if fitting:
                    fits[j] += 1
                    reply = first_line(tokenizer, in_context_reply(model, ids))
                    hits["in_context"][j] += is_right(reply, ep["answer"], model.memory_config.task)
            for got, stored, rate in recall_counts(model, tokenizer, state, prompt, block):
                recall[j] = [recall[j][0] + got, recall[j][1] + stored, recall[j][2] + rate, recall[j][3] + 1]
    return dict(hits=hits, tokens=tokens, fits=fits, recall=recall, by_form=by_form,
                big_error=big_error if big_name not in skip else None)


def _worker(folder: str, memory: dict, job: dict, indices: list[int]) -> dict:
    """One process's share of the episodes: the model loaded anew, one thread."""
    torch.set_num_threads(1)
    model = load_mplus(folder)
    model.memory_config = MemoryConfig.from_dict(memory)  # with --initial-rf as the parent set it
    tokenizer = Tokenizer.from_file(folder)
    test = trials(model, tokenizer, seed=job["seed"], episodes=job["episodes"], n_chunks=max(job["distances"]),
                  chunk_words=job["chunk_words"], filler_words=job["filler_words"])
    return count_hits(model, tokenizer, test, indices, job, progress=indices[0] == 0)


def in_processes(folder, memory: dict, job: dict, jobs: int) -> dict:
    """count_hits over every episode, split across `jobs` spawned processes, the counts summed."""
    import multiprocessing
    if folder is None:
        raise ValueError("jobs > 1 needs the model's folder: each process loads the model itself")
    shares = [list(range(k, job["episodes"], jobs)) for k in range(jobs)]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        parts = pool.starmap(_worker, [(str(folder), memory, job, share) for share in shares if share])
    total = parts[0]
    for part in parts[1:]:
        for key in ("hits", "by_form"):
            for m in total[key]:
                total[key][m] = [a + b for a, b in zip(total[key][m], part[key][m])]
        total["tokens"] = [a + b for a, b in zip(total["tokens"], part["tokens"])]
        total["fits"] = [a + b for a, b in zip(total["fits"], part["fits"])]
        total["recall"] = [[a + b for a, b in zip(r, q)] for r, q in zip(total["recall"], part["recall"])]
    return total


INTERFERENCE = ("mplus", "memoryllm", "base_in_context")


def interference(model: MPlus, tokenizer: Tokenizer, *, seed: int, episodes: int, n_people: int = 5,
                  filler_words: int = 12, progress: bool = True) -> dict:
    """Telling people apart: n_people facts of one kind, one chunk each, then every person asked (retention_trials.
    interference_trials). Per model (mplus, memoryllm, and base_in_context: the base model without adapters or
    memory, the five chunks in its prompt, what the frozen base itself can do): the share of right answers, and of
    answers holding another of the people's values instead."""
    trials_ = interference_trials(model, tokenizer, seed=seed, episodes=episodes, n_people=n_people,
                                  filler_words=filler_words)
    right, other = {m: 0 for m in INTERFERENCE}, {m: 0 for m in INTERFERENCE}
    for i, ep in enumerate(tqdm(trials_, desc="interference", unit="episode", disable=not progress)):
        state = model.initial_state(seed=seed * 100_003 + i)
        for chunk in ep["chunks"]:
            model.inject(state, tokenizer.encode(chunk), allow_short=True)
        for name, s in (("mplus", state), ("memoryllm", state.without_ltm())):
            for q in ep["questions"]:
                out = model.generate(s, tokenizer.encode(q["prompt"]), max_new_tokens=16,
                                     stop_ids=stop_ids(model, tokenizer))
                line = first_line(tokenizer, out)
                hit = is_right(line, q["answer"], "people")
                right[name] += hit
                other[name] += not hit and any(is_right(line, v, "people") for v in q["others"])
        for q in ep["questions"]:
            line = first_line(tokenizer, in_context_reply(model, tokenizer.encode(q["in_context"]), adapter=None))
            hit = is_right(line, q["answer"], "people")
            right["base_in_context"] += hit
            other["base_in_context"] += not hit and any(is_right(line, v, "people") for v in q["others"])
    n = episodes * n_people
    return {"people": n_people, "questions": n, **{f"{m}_right": right[m] / n for m in right},
            **{f"{m}_other_person": other[m] / n for m in other}}
