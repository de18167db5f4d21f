"""Flow-matching diffusion sampling (SANA): diffusers-exact Flow-Euler and Flow-DPM-Solver++
schedules, their solver steps, and a jitted text-to-image sampling loop with classifier-free
guidance and per-image seeds; the SANA text-to-image pipeline (`SanaPipeline`, loaded by
`jaxstack.hf.load_sana`).

    from jaxstack.diffusion import initial_latents, sample
"""

from jaxstack.diffusion.pipeline import DEFAULT_CHI, SanaPipeline, SanaVelocity, save_images
from jaxstack.diffusion.sample import cfg_combine, guided_velocity, initial_latents, sample
from jaxstack.diffusion.schedulers import (
    SCHEDULERS,
    FlowSchedule,
    dpm_solver_coefficients,
    dpm_solver_orders,
    dpm_solver_step,
    flow_dpm_solver_schedule,
    flow_euler_schedule,
    flow_euler_step,
    flow_shift,
    make_schedule,
    solve,
)

__all__ = [
    "DEFAULT_CHI",
    "SCHEDULERS",
    "FlowSchedule",
    "SanaPipeline",
    "SanaVelocity",
    "cfg_combine",
    "dpm_solver_coefficients",
    "dpm_solver_orders",
    "dpm_solver_step",
    "flow_dpm_solver_schedule",
    "flow_euler_schedule",
    "flow_euler_step",
    "flow_shift",
    "guided_velocity",
    "initial_latents",
    "make_schedule",
    "sample",
    "save_images",
    "solve",
]
