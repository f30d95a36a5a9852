"""Stage 1 nodes: pick or define a skill, configure the prompt writer, generate prompts."""

from __future__ import annotations

from dataclasses import dataclass

from ..selma_backend.errors import invalid
from ..selma_backend.fsio import read_jsonl
from ..selma_backend.llm.backends import CHAT_BACKENDS, DEFAULT_BASE_URL, ChatConfig, make_chat_backend
from ..selma_backend.llm.transformers_backend import list_local_llms
from ..selma_backend.paths import safe_join
from ..selma_backend.prompts.generate import PromptConfig, backend_names, generate_prompts
from ..selma_backend.skills import FLIP_POLICIES, list_skills, resolve_skill, skill_from_fields
from .glue import (
    CATEGORY,
    interrupted,
    io,
    model_folders,
    output_dir,
    progress_callback,
    raise_if_interrupted,
    ui,
    user_dir,
)
from .skills import skills_dir

Skill = io.Custom("SELMA_SKILL")
LLM = io.Custom("SELMA_LLM")
Prompts = io.Custom("SELMA_PROMPTS")
_DEFAULTS = PromptConfig.__dataclass_fields__
_PREVIEW = 50  # prompts shown in the STRING preview list


@dataclass(frozen=True)
class LLMChoice:
    """What flows on a SELMA_LLM wire: a backend name and, for a chat model, its config (no key)."""

    name: str
    config: ChatConfig | None = None


def _local_llms() -> list[str]:
    names = sorted({n for root in model_folders("LLM") if root.is_dir() for n in list_local_llms(root)})
    return names or ["(none in models/LLM)"]


def _local_llm_path(name: str) -> str:
    # Only a name the dropdown offers: model folders may be symlinks to big disks, so membership in
    # the listing (not path resolution) is what keeps a typed value from reaching elsewhere.
    for root in model_folders("LLM"):
        if root.is_dir() and name in list_local_llms(root):
            return str(root / name)
    raise invalid("local_model", name, _local_llms(), "put a model folder under models/LLM and refresh the page")


class SelmaSkill(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelmaSkill", display_name="SELMA Skill", category=CATEGORY,
            description="Pick a skill to teach: a built-in one or a skill file from user/selma/skills.",
            inputs=[io.Combo.Input("skill_id", options=[s.id for s in list_skills(skills_dir())], default="countbench",
                                   tooltip="The skill's id. Built-in: SELMA's five plus spatial, attributes, product.")],
            outputs=[Skill.Output("skill", display_name="skill", tooltip="The chosen skill, for the prompt generator.")],
        )

    @classmethod
    def execute(cls, skill_id: str) -> io.NodeOutput:
        return io.NodeOutput(resolve_skill(skill_id, skills_dir()))


class SelmaCustomSkill(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelmaCustomSkill", display_name="SELMA Custom Skill", category=CATEGORY,
            description="Define a skill right here: an id, a name, the rules for the prompt writer and at least "
            "three example prompts (one per line).",
            inputs=[
                io.String.Input("skill_id", default="my_skill", tooltip="Lowercase letters, digits, '_' and '-'."),
                io.String.Input("name", default="My skill", tooltip="A display name."),
                io.String.Input("instruction", multiline=True, default="Write short, concrete image captions that ...",
                                tooltip="The rules the LLM must follow when it writes prompts for this skill."),
                io.String.Input("examples", multiline=True, default="",
                                tooltip="At least three example prompts, one per line."),
                io.Int.Input("word_limit", default=30, min=3, max=300, tooltip="Every prompt has fewer words than this."),
                io.Combo.Input("flip", options=list(FLIP_POLICIES), default="allow",
                               tooltip="Training's horizontal flip: allow, never (text, logos), or swap_left_right "
                               "(mirror and swap 'left'/'right' in the caption)."),
            ],
            outputs=[Skill.Output("skill", display_name="skill", tooltip="The skill, for the prompt generator.")],
        )

    @classmethod
    def execute(cls, skill_id: str, name: str, instruction: str, examples: str, word_limit: int,
                flip: str) -> io.NodeOutput:
        return io.NodeOutput(skill_from_fields(id=skill_id, name=name, instruction=instruction, examples=examples,
                                               word_limit=word_limit, flip=flip))


class SelmaLLM(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelmaLLM", display_name="SELMA Prompt Writer (LLM)", category=CATEGORY,
            description="Choose who writes the prompts: 'offline' (built-in grammars, no model), an OpenAI-compatible "
            "server (OpenAI, Ollama, vLLM, llama.cpp, LM Studio), or a local model from models/LLM. The API key comes "
            "from SELMA_LLM_API_KEY / OPENAI_API_KEY or user/selma/llm_api_key, never from a widget.",
            inputs=[
                io.Combo.Input("backend", options=backend_names(), default="offline", tooltip="Who writes the prompts."),
                io.String.Input("base_url", default=DEFAULT_BASE_URL, tooltip="openai: the server's /v1 URL."),
                io.String.Input("model", default="", tooltip="openai: the model name the server serves, e.g. llama3.1:8b."),
                io.Combo.Input("local_model", options=_local_llms(), tooltip="transformers: a folder under models/LLM."),
                io.Float.Input("temperature", default=1.0, min=0.0, max=2.0, step=0.05, tooltip="Higher: more varied prompts."),
                io.Int.Input("max_tokens", default=1024, min=16, max=32768, tooltip="Longest reply per request."),
                io.Float.Input("timeout_s", default=120.0, min=1.0, max=3600.0, tooltip="openai: seconds per request."),
                io.Int.Input("max_retries", default=4, min=0, max=50, tooltip="openai: retries on 429/5xx/timeouts."),
            ],
            outputs=[LLM.Output("llm", display_name="llm", tooltip="The prompt writer, for the prompt generator.")],
        )

    @classmethod
    def execute(cls, backend: str, base_url: str, model: str, local_model: str, temperature: float, max_tokens: int,
                timeout_s: float, max_retries: int) -> io.NodeOutput:
        if backend not in CHAT_BACKENDS:
            return io.NodeOutput(LLMChoice(backend))
        path = _local_llm_path(local_model) if backend == "transformers" else ""
        config = ChatConfig(backend=backend, base_url=base_url, model=model, model_path=path, temperature=temperature,
                            max_tokens=max_tokens, timeout_s=timeout_s, max_retries=max_retries)
        return io.NodeOutput(LLMChoice(backend, config))


class SelmaGeneratePrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelmaGeneratePrompts", display_name="SELMA Generate Prompts", category=CATEGORY,
            description="Stage 1: the prompt writer learns the skill from its examples and writes many new prompts; "
            "near-duplicates (ROUGE-L) are dropped. Writes output/selma/<project>/prompts/<skill>-seed<seed>.jsonl, "
            "resumable: a larger count continues the file, a new seed starts another.",
            inputs=[
                Skill.Input("skill", tooltip="From SELMA Skill or SELMA Custom Skill."),
                io.Int.Input("count", default=100, min=1, max=1_000_000, tooltip="Prompts the file should hold."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Same seed, same prompts (offline writer: byte-identical)."),
                io.String.Input("project", default="selma", tooltip="Folder under output/selma/ for this project."),
                io.Float.Input("dedup_threshold", default=_DEFAULTS["dedup_threshold"].default, min=0.0, max=1.0,
                               step=0.01, tooltip="Drop a prompt whose ROUGE-L F with an earlier one is above this."),
                io.Int.Input("examples_per_request", default=_DEFAULTS["examples_per_request"].default, min=1, max=20,
                             tooltip="Examples shown to the writer per request."),
                io.Int.Input("batch_size", default=_DEFAULTS["batch_size"].default, min=1, max=100,
                             tooltip="Prompts asked for per request."),
                io.String.Input("blocklist", multiline=True, default="",
                                tooltip="Terms (one per line, whole words, any case) or re:REGEX lines; matching "
                                "prompts are rejected (e.g. living artists' or brand names)."),
                LLM.Input("llm", optional=True, tooltip="From SELMA Prompt Writer; without it, the offline writer."),
            ],
            outputs=[
                Prompts.Output("prompts", display_name="prompts", tooltip="The prompt file, for rendering."),
                io.String.Output("preview", display_name="preview", is_output_list=True, tooltip=f"The first {_PREVIEW} prompts."),
                io.String.Output("report", display_name="report", tooltip="Counts: requests, kept, rejected by reason."),
            ],
        )

    @classmethod
    def execute(cls, skill, count: int, seed: int, project: str, dedup_threshold: float, examples_per_request: int,
                batch_size: int, blocklist: str, llm: LLMChoice | None = None) -> io.NodeOutput:
        llm = llm or LLMChoice("offline")
        entries = tuple(ln.strip() for ln in blocklist.splitlines() if ln.strip())
        kwargs = {"temperature": llm.config.temperature, "max_tokens": llm.config.max_tokens} if llm.config else {}
        config = PromptConfig(skill=skill, count=count, llm=llm.name, seed=seed, examples_per_request=examples_per_request,
                              batch_size=batch_size, dedup_threshold=dedup_threshold, blocklist=entries, **kwargs)
        out = safe_join(output_dir(), f"selma/{project}", field="project") / "prompts" / f"{skill.id}-seed{seed}.jsonl"
        backend = make_chat_backend(llm.config, user_dir=user_dir()) if llm.config else None
        try:
            report = generate_prompts(config, out, backend=backend, progress=progress_callback(count, "prompts", skill.id),
                                      should_stop=interrupted)
        finally:
            if backend is not None:
                backend.close()
        raise_if_interrupted()
        prompts = [r["prompt"] for r in read_jsonl(out)]
        text = f"{report.message}\nrequests {report.requests}, rejected {report.rejected}, blocklist {report.blocklist_hits}"
        return io.NodeOutput({"path": str(out), "skill": skill.id, "count": len(prompts)}, prompts[:_PREVIEW], text,
                             ui=ui.PreviewText(text))
