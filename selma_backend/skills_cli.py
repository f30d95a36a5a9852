"""``selma skills``: list the built-in and user skills (or show one in full)."""

from __future__ import annotations

import argparse
import json

from .skills import ENV_SKILLS_DIR, list_skills, resolve_skill


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("skill", nargs="?", help="show this skill (id or .json/.toml file) in full instead of the list")
    parser.add_argument("--skills-dir", default=None, help=f"folder of user skill files (default: ${ENV_SKILLS_DIR} if set)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    if args.skill:
        skill = resolve_skill(args.skill, args.skills_dir)
        print(json.dumps(skill.to_dict(), ensure_ascii=False, indent=2))
        return 0
    skills = list_skills(args.skills_dir)
    if args.json:
        print(json.dumps([s.to_dict() for s in skills], ensure_ascii=False, indent=2))
        return 0
    rows = [("id", "name", "words", "flip", "origin")]
    rows += [(s.id, s.name, f"< {s.word_limit}", s.flip, s.origin) for s in skills]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    return 0
