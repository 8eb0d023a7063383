"""Token generation: a prefill, then one cached decode step per new token.

Sampling is greedy when temperature is 0, otherwise temperature + top-p (nucleus) sampling drawn from an
explicit torch.Generator, so the same seed gives the same tokens.
"""
from __future__ import annotations

import math
import operator
from typing import Callable, Iterable, Iterator

import torch


def check_sampling(temperature: float, top_p: float) -> None:
    """Refuse settings that would reach torch.multinomial as NaN or negative probabilities."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")


def new_token_budget(max_new_tokens: int, used_positions: int, max_positions: int) -> int:
    """max_new_tokens capped so that the sequence stays within the model's positions (max_position_embeddings):
    a cache is then never sized by a huge request. used_positions: positions before the first new token.
    Refuses a prompt that already passes the last position, or that fills it while new tokens are asked for."""
    try:
        max_new_tokens = operator.index(max_new_tokens)
    except TypeError:
        raise ValueError(f"max_new_tokens must be a whole number, got {max_new_tokens!r}") from None
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if used_positions > max_positions or (used_positions == max_positions and max_new_tokens > 0):
        raise ValueError(f"the prompt needs {used_positions} positions but the model has {max_positions} "
                         "(max_position_embeddings), leaving no room for new tokens: shorten the prompt")
    return min(max_new_tokens, max_positions - used_positions)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches top_p; renormalise. probs [V]."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)  # [V] each
    mass_before = sorted_probs.cumsum(0) - sorted_probs  # [V] mass of strictly more likely tokens
    sorted_probs[mass_before >= top_p] = 0.0  # the most likely token always survives
    kept = torch.zeros_like(probs).scatter_(0, order, sorted_probs)  # [V]
    return kept / kept.sum()


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> int:
    """Pick the next token id from fp32 logits [V]."""
    check_sampling(temperature, top_p)
    if temperature <= 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [V]
    return int(torch.multinomial(top_p_filter(probs, top_p), 1, generator=generator))


def prompt_tensor(prompt_ids) -> torch.Tensor:
    if isinstance(prompt_ids, (str, bytes)):
        raise TypeError(f"expected token ids, got {type(prompt_ids).__name__} {str(prompt_ids)[:40]!r}: encode the text "
                        "with the model's tokenizer first: mplus.Tokenizer.from_file(folder / 'tokenizer.json').encode(text)")
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError("prompt_ids must be a non-empty list of token ids (or a [T] / [1, T] tensor)")
    return ids[None]  # [1, T]


def decode_loop(prefill: Callable[[], torch.Tensor], step: Callable[[int], torch.Tensor], *,
                max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None, stop: set[int] = frozenset()) -> Iterator[int]:
    """The sampling loop shared by every model: prefill() -> logits [V], then step(token) -> logits [V]."""
    check_sampling(temperature, top_p)
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if max_new_tokens == 0:
        return
    with torch.inference_mode():
        logits = prefill()  # [V]
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, generator)
        yield token
        if token in stop or i == max_new_tokens - 1:
            return
        with torch.inference_mode():  # not held across the yield: the caller's code runs outside it
            logits = step(token)  # [V]


def generate_tokens(model, prompt_ids, *, max_new_tokens: int = 64, temperature: float = 0.0,
                    top_p: float = 1.0, generator: torch.Generator | None = None,
                    stop_ids: Iterable[int] | None = None) -> Iterator[int]:
    """Yield new token ids one by one (streaming); stops after a stop id (yielded) or max_new_tokens, which is
    capped by the model's positions (see new_token_budget). Bad arguments raise ValueError on the call itself."""
    ids = prompt_tensor(prompt_ids)  # [1, T]
    check_sampling(temperature, top_p)
    max_new_tokens = new_token_budget(max_new_tokens, ids.shape[1], model.config.max_position_embeddings)
    cache = model.new_cache(ids.shape[1] + max(max_new_tokens, 1))
    return decode_loop(lambda: model(ids, cache=cache, last_only=True)[0, -1],
                           lambda token: model(torch.tensor([[token]]), cache=cache, last_only=True)[0, -1],
                           max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           generator=generator, stop=set(model.config.eos_token_id if stop_ids is None else stop_ids))


def collect(tokens: Iterator[int], on_token: Callable[[int], None] | None = None) -> list[int]:
    """Drain a token stream into a list, calling on_token with each token as it comes."""
    out = []
    for token in tokens:
        out.append(token)
        if on_token is not None:
            on_token(token)
    return out


def generate(model, prompt_ids, *, on_token: Callable[[int], None] | None = None, **kwargs) -> list[int]:
    """The new token ids after prompt_ids (greedy by default); on_token is called with each as it comes.
    Keyword arguments as for generate_tokens."""
    return collect(generate_tokens(model, prompt_ids, **kwargs), on_token)
