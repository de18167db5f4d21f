"""Flow-matching diffusion sampling (SANA): diffusers-exact Flow-Euler and Flow-DPM-Solver++
schedules, their solver steps, and a jitted text-to-image sampling loop with classifier-free
guidance and per-image seeds.

    from jaxstack.diffusion import initial_latents, sample
"""

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
    "SCHEDULERS",
    "FlowSchedule",
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
    "solve",
]
