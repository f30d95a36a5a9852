"""Stage 1: write prompts for a skill with a chat model (or offline), parse, screen and deduplicate them.

    from selma_backend.prompts import PromptConfig, generate_prompts

    report = generate_prompts(PromptConfig(skill="spatial", count=1000, seed=0), "work/spatial/prompts.jsonl")

Modules: :mod:`.generate` (the loop, config, report), :mod:`.parse` (messy replies -> items),
:mod:`.dedup` (ROUGE-L exactly as rouge_score, fast), :mod:`.offline` (the model-free backend),
:mod:`.cli` (``selma prompts``).
"""

from .dedup import RougePool, dedup, rouge_l_f, rouge_tokens
from .generate import (
    PromptBudgetExhausted,
    PromptConfig,
    PromptReport,
    backend_names,
    build_messages,
    generate_prompts,
    load_prompt_texts,
    report_path,
)
from .offline import OfflineBackend, offline_skills

__all__ = [
    "OfflineBackend",
    "PromptBudgetExhausted",
    "PromptConfig",
    "PromptReport",
    "RougePool",
    "backend_names",
    "build_messages",
    "dedup",
    "generate_prompts",
    "load_prompt_texts",
    "offline_skills",
    "report_path",
    "rouge_l_f",
    "rouge_tokens",
]
