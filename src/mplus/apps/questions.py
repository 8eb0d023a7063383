"""How the demo and the benchmarks ask a question of a model trained on this project's fact task."""
from __future__ import annotations

from mplus.data.facts import qa_prompt


def question_prompt(model, question: str) -> str:
    """The question as the model reads it: in its checkpoint's question template (config.json
    "mplus_question_template", as `mplus ask` applies it), or, for a checkpoint saved without one (an
    intermediate training stage), in the format the fact task trains on (data/facts.py, qa_prompt)."""
    memory = model.memory_config
    return qa_prompt(question) if memory.question_template is None else memory.question_prompt(question)
