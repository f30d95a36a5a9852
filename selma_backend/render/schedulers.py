"""Samplers a render may use: a registry of diffusers schedulers (the node dropdown is built from it).

Names follow ComfyUI's sampler/scheduler names where one exists (``dpmpp_2m`` + ``_karras``), so an
artist recognises them. Each entry builds its scheduler from the model's own scheduler config
(``from_config``), which keeps the model's training schedule (betas, ``prediction_type``,
``timestep_spacing``, ``steps_offset``) and changes only the solver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..registry import Registry


@dataclass(frozen=True)
class SchedulerSpec:
    label: str  # what a person reads ("DPM++ 2M Karras")
    class_name: str  # diffusers class; "" keeps the model's own scheduler
    options: dict[str, Any] = field(default_factory=dict)  # overrides passed to from_config
    stochastic: bool = False  # draws fresh noise each step (from the per-image generators)


SCHEDULERS: Registry[SchedulerSpec] = Registry("scheduler")
SCHEDULERS.add("dpmpp_2m", SchedulerSpec("DPM++ 2M", "DPMSolverMultistepScheduler",
                                         {"algorithm_type": "dpmsolver++", "solver_order": 2}))
SCHEDULERS.add("dpmpp_2m_karras", SchedulerSpec("DPM++ 2M Karras", "DPMSolverMultistepScheduler",
                                                {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                 "use_karras_sigmas": True}))
SCHEDULERS.add("dpmpp_2m_sde_karras", SchedulerSpec("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler",
                                                    {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                                                     "use_karras_sigmas": True}, stochastic=True))
SCHEDULERS.add("euler", SchedulerSpec("Euler", "EulerDiscreteScheduler"))
SCHEDULERS.add("euler_a", SchedulerSpec("Euler a", "EulerAncestralDiscreteScheduler", stochastic=True))
SCHEDULERS.add("heun", SchedulerSpec("Heun", "HeunDiscreteScheduler"))
SCHEDULERS.add("lms", SchedulerSpec("LMS", "LMSDiscreteScheduler"))
SCHEDULERS.add("ddim", SchedulerSpec("DDIM", "DDIMScheduler"))
SCHEDULERS.add("pndm", SchedulerSpec("PNDM", "PNDMScheduler", {"skip_prk_steps": True}))
SCHEDULERS.add("unipc", SchedulerSpec("UniPC", "UniPCMultistepScheduler"))
SCHEDULERS.add("model_default", SchedulerSpec("the model's own scheduler", ""))


def scheduler_names() -> list[str]:
    return SCHEDULERS.names()


def build_scheduler(name: str, base: Any) -> Any:
    """A new scheduler ``name`` configured from the model's scheduler ``base`` (which is not changed)."""
    spec = SCHEDULERS.get(name)
    if not spec.class_name:
        return base.__class__.from_config(base.config)  # a fresh copy: solvers keep per-run state
    import diffusers

    cls = getattr(diffusers, spec.class_name)
    return cls.from_config(base.config, **spec.options)
