"""Skill nodes (stage 1's vocabulary): list what is available."""

from __future__ import annotations

from ..selma_backend.fsio import folder_fingerprint
from ..selma_backend.skills import SKILL_FILE_SUFFIXES, list_skills
from .glue import CATEGORY, io, ui, user_dir


def skills_dir():
    return user_dir() / "selma" / "skills"


class SelmaListSkills(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelmaListSkills",
            display_name="SELMA List Skills",
            category=CATEGORY,
            description="Lists the skills SELMA can teach: the built-in ones and your own skill files "
            "(user/selma/skills/*.toml|json). Shows each skill's id, name, word limit and flip policy.",
            inputs=[
                io.Boolean.Input("include_user_skills", default=True,
                                 tooltip="Also list skill files from ComfyUI's user folder (user/selma/skills)."),
            ],
            outputs=[
                io.String.Output("table", display_name="table", tooltip="One line per skill: id, name, word limit, flip policy."),
                io.String.Output("skill_ids", display_name="skill_ids", is_output_list=True,
                                 tooltip="The skill ids, one list item each (wire into a prompt generator)."),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, include_user_skills: bool = True) -> str:
        # Re-run when a user skill file is added, edited or removed (ComfyUI caches on inputs).
        return f"{include_user_skills}|{folder_fingerprint(skills_dir(), SKILL_FILE_SUFFIXES)}"

    @classmethod
    def execute(cls, include_user_skills: bool = True) -> io.NodeOutput:
        skills = list_skills(skills_dir() if include_user_skills else None)
        lines = [f"{s.id}\t{s.name}\t<{s.word_limit} words\tflip: {s.flip}" for s in skills]
        table = "\n".join(lines)
        return io.NodeOutput(table, [s.id for s in skills], ui=ui.PreviewText(table))
