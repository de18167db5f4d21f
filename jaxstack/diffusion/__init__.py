"""Flow-matching diffusion sampling (SANA): diffusers-exact Flow-Euler and Flow-DPM-Solver++
schedules, their solver steps, and a jitted text-to-image sampling loop with classifier-free
guidance and per-image seeds; the SANA text-to-image pipeline (`SanaPipeline`, loaded by
`jaxstack.hf.load_sana`); the NVILA yes/no verifier of SANA-1.5's inference-time scaling
(`VLMVerifier`) and the tournament that picks among N samples (`tournament_pick`, `best_of_n`).

    from jaxstack.diffusion import initial_latents, sample
"""

from jaxstack.diffusion.pipeline import DEFAULT_CHI, SanaPipeline, SanaVelocity, save_images
from jaxstack.diffusion.sample import cfg_combine, guided_velocity, initial_latents, sample
from jaxstack.diffusion.scaling import best_of_n, tournament_pick
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
from jaxstack.diffusion.verifier import DEFAULT_TEMPLATE, VLMVerifier

__all__ = [
    "DEFAULT_CHI",
    "DEFAULT_TEMPLATE",
    "SCHEDULERS",
    "FlowSchedule",
    "SanaPipeline",
    "SanaVelocity",
    "VLMVerifier",
    "best_of_n",
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
    "tournament_pick",
]
