"""Stage-6 configuration: how models are rendered, scored and compared. One frozen dataclass, validated
on construction, shared by the CLI, the node and the tests, and recorded in ``scores.json``.

Where the prompts come from is :class:`selma_backend.eval.prompts.PromptSpec` (also recorded).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import check_int, check_number, invalid
from ..render.config import RenderConfig


@dataclass(frozen=True)
class EvalConfig:
    """How stage 6 evaluates (see ``selma_backend.eval.run.evaluate``).

    render: the render settings every model gets (steps, cfg, size, scheduler, seed, batch size;
        ``images_per_prompt`` images per prompt and model). Image (prompt, sample) has the same seed
        for every model, so the base and each LoRA start from the same noise.
    lora_scale: the strength each LoRA is applied with (1.0: as trained / merged).
    resamples / confidence / stats_seed: the percentile bootstrap (see ``stats``).
    grid_prompts: prompts per skill shown in the side-by-side grids (all are scored).
    vqa_url / vqa_model: an OpenAI-compatible vision-language endpoint; both empty: no DSG score.
        question_model writes the questions ("" = vqa_model). The API key comes from the environment
        (``vqa_key_env``, else SELMA_LLM_API_KEY / OPENAI_API_KEY) or the ComfyUI user folder, never from here.
    vqa_workers: images asked about in parallel (HTTP requests in flight).
    max_questions: questions kept per prompt (the first ones: entities come first).
    """

    render: RenderConfig = field(default_factory=lambda: RenderConfig(steps=25, batch_size=4))
    lora_scale: float = 1.0
    resamples: int = 2000
    confidence: float = 0.95
    stats_seed: int = 0
    grid_prompts: int = 4
    vqa_url: str = ""
    vqa_model: str = ""
    question_model: str = ""
    vqa_key_env: str = ""
    vqa_timeout_s: float = 120.0
    vqa_max_retries: int = 4
    vqa_workers: int = 4
    max_questions: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.render, dict):
            object.__setattr__(self, "render", RenderConfig.from_dict(self.render))
        if not isinstance(self.render, RenderConfig):
            raise invalid("render", self.render, "a RenderConfig")
        check_number("lora_scale", self.lora_scale, -10.0, 10.0)
        check_int("resamples", self.resamples, 100, 1_000_000)
        if isinstance(self.confidence, bool) or not isinstance(self.confidence, (int, float)) \
                or not 0.5 <= self.confidence < 1:
            raise invalid("confidence", self.confidence, "a number from 0.5 to below 1", "0.95 for 95% intervals")
        check_int("stats_seed", self.stats_seed, 0, 2**63 - 1)
        check_int("grid_prompts", self.grid_prompts, 1, 1000)
        check_int("vqa_max_retries", self.vqa_max_retries, 0, 50)
        check_int("vqa_workers", self.vqa_workers, 1, 256)
        check_int("max_questions", self.max_questions, 1, 200)
        check_number("vqa_timeout_s", self.vqa_timeout_s, 1.0, 3600.0)
        for name in ("vqa_url", "vqa_model", "question_model", "vqa_key_env"):
            if not isinstance(getattr(self, name), str):
                raise invalid(name, getattr(self, name), "a string ('' for none)")
            object.__setattr__(self, name, getattr(self, name).strip())
        if bool(self.vqa_url) != bool(self.vqa_model):
            raise invalid("vqa_url/vqa_model", "only one of them", "both (DSG question score) or neither (CLIP only)",
                          "e.g. vqa_url='http://127.0.0.1:11434/v1', vqa_model='qwen2.5vl:7b'")
        if self.question_model and not self.vqa_url:
            raise invalid("question_model", self.question_model, "'' when no vqa_url is set")
        if self.uses_vqa:
            self.chat_config("answer")  # validates the URL (no credentials in it) and the key variable name

    @property
    def uses_vqa(self) -> bool:
        return bool(self.vqa_url)

    def chat_config(self, role: str) -> Any:
        """The ``ChatConfig`` of the question writer (``role="question"``) or the answerer (``"answer"``)."""
        from ..llm.backends import ChatConfig

        if role not in ("question", "answer"):
            raise invalid("role", role, ["question", "answer"])
        model = (self.question_model or self.vqa_model) if role == "question" else self.vqa_model
        return ChatConfig(backend="openai", base_url=self.vqa_url, model=model, temperature=0.0,
                          max_tokens=1024 if role == "question" else 64, timeout_s=float(self.vqa_timeout_s),
                          max_retries=self.vqa_max_retries, api_key_env=self.vqa_key_env)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["render"] = self.render.to_dict()
        return d

