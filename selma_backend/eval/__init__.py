"""Stage 6: measure what each skill bought -- base vs experts vs merged, with confidence intervals.

    from selma_backend.eval import EvalConfig, PromptSpec, evaluate

    report = evaluate(ModelConfig(path="models/checkpoints/sd15.safetensors"),
                      ["models/loras/selma/countbench.safetensors", "models/loras/selma/merged.safetensors"],
                      PromptSpec(heldout_skills=("countbench",), train_prompts=("work/countbench/prompts.jsonl",)),
                      ScorerConfig(path="models/clip/ViT-B-32"), "work/eval/run1", EvalConfig())
    print(report.table)          # per skill and model: mean [95% CI], difference to base [95% CI]

Modules: :mod:`.config` (EvalConfig), :mod:`.prompts` (held-out and user prompt files, contamination),
:mod:`.models` (base + LoRA entries, applying a LoRA), :mod:`.render` (same seeds, batches),
:mod:`.dsg` (DSG-style questions and answers), :mod:`.stats` (bootstrap), :mod:`.summary` (tables),
:mod:`.chart` / :mod:`.grid` / :mod:`.html` / :mod:`.report` (the report folder), :mod:`.run`
(``evaluate``), :mod:`.cli` (``selma eval``). Importing this package loads neither torch nor diffusers.
"""

from .config import EvalConfig
from .prompts import PromptSet, PromptSpec, collect_prompts, find_contaminated, heldout_prompts, load_eval_prompts
from .report import next_run_dir
from .run import EvalReport, evaluate
from .stats import Estimate, bootstrap_ci, paired_difference, percentile_interval, verdict

__all__ = ["Estimate", "EvalConfig", "EvalReport", "PromptSet", "PromptSpec", "bootstrap_ci", "collect_prompts",
           "evaluate", "find_contaminated", "heldout_prompts", "load_eval_prompts", "next_run_dir",
           "paired_difference", "percentile_interval", "verdict"]
