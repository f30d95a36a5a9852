"""A miniature world where SELMA's claims can be checked on a CPU.

Images of simple shapes (circle, square, triangle, star, diamond, cross) in eight colours, one or two
sizes, counts of one to four, spatial relations and three backgrounds, rendered at 32-64 px with
exact ground truth (:mod:`.scene`); natural captions from varied templates and their exact parser
(:mod:`.captions`); an exact judge answering DSG-style yes/no questions (:mod:`.judge`); the world's
skills with offline, seeded prompt generators and a stable train/held-out split (:mod:`.skills`); and
a writer of SELMA dataset folders (:mod:`.dataset`). ``selma world ...`` drives it from a shell.

    from selma_backend.world import world_prompts, render_world_dataset, judge

    rows = world_prompts("world_spatial", 100, seed=0)
    render_world_dataset(rows, "work/spatial/data")
    judge(image, "a yellow star to the left of a green triangle").score

A small open_clip CLIP trained contrastively on the world (:mod:`.clip_train`, ``selma world
train-clip``) ships in ``assets/world-clip`` (:data:`WORLD_CLIP`, loadable by
``selma_backend.filter.load_scorer``); :func:`evaluate_clip` scores a CLIP on held-out minimal pairs
(:mod:`.alter`) and against the judge.
"""

from .alter import ALTERATIONS, EVAL_ALTERATIONS, alterations, false_on, minimal_pair
from .captions import caption, parse_caption
from .clip_eval import WORLD_CLIP, evaluate_clip, format_table
from .clip_train import MODEL_PRESETS, ClipTrainConfig, train_clip
from .dataset import WorldRenderConfig, judge_dataset, render_world_dataset
from .judge import Detection, Detections, JudgeConfig, JudgeResult, detect, judge, questions_for
from .scene import Scene, SceneObject, render_scene, sample_scene
from .skills import WORLD_SKILLS, as_selma_skill, split_of, world_prompts, write_prompts, write_skill_files
from .spec import BACKGROUNDS, COLOURS, COMMON_COLOURS, RELATIONS, SHAPES, SIZES, Entity, PromptSpec, Relation

__all__ = [
    "ALTERATIONS", "EVAL_ALTERATIONS", "MODEL_PRESETS", "WORLD_CLIP", "ClipTrainConfig", "alterations",
    "evaluate_clip", "false_on", "format_table", "minimal_pair", "train_clip",
    "BACKGROUNDS", "COLOURS", "COMMON_COLOURS", "RELATIONS", "SHAPES", "SIZES", "WORLD_SKILLS",
    "Detection", "Detections", "Entity", "JudgeConfig", "JudgeResult", "PromptSpec", "Relation", "Scene",
    "SceneObject", "WorldRenderConfig", "as_selma_skill", "caption", "detect", "judge", "judge_dataset",
    "parse_caption", "questions_for", "render_scene", "render_world_dataset", "sample_scene", "split_of",
    "world_prompts", "write_prompts", "write_skill_files",
]
