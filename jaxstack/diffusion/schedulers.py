"""Flow-matching sampler schedules and solver steps (SANA: Flow-Euler and Flow-DPM-Solver++).

Schedules are host-side NumPy (they depend only on the static step count and shift), computed
exactly as diffusers computes them, so a sampler built here walks the same sigmas and feeds the
model the same timesteps as the diffusers pipeline:

* Flow-Euler = `FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(N)`. Its quirk: the
  timesteps are linspace(1000, 1000 sigma_min, N) with sigma_min = shift(0.001) already shifted,
  and the result is shifted *again* (s = 3, N = 5 gives sigmas [1, 0.90036, 0.75112, 0.50299,
  0.00893, 0]). The model sees timestep sigma * 1000 (float32).
* Flow-DPM-Solver++ = `DPMSolverMultistepScheduler(flow_shift=s, use_flow_sigmas=True,
  prediction_type="flow_prediction")` with its defaults (solver_order=2, "dpmsolver++",
  "midpoint", lower_order_final=True, final_sigmas_type="zero"): sigmas = shift(1 - linspace(1,
  0.001, N + 1)) reversed without its last (zero) entry, then 0 appended (s = 3, N = 5 gives
  [0.99967, 0.92272, 0.81781, 0.6663, 0.42827, 0]). The model sees the *integer* timestep
  int(sigma * 1000) (diffusers stores them as int64), while the solver uses the exact sigma.

Solver steps (x float32 latents of any shape, v the model's velocity at x):

    Euler:          x' = x + (sigma_next - sigma) v
    DPM-Solver++:   m = x - sigma v                          (data prediction)
                    x' = a x + b m + c (m - m_prev)           (2M, midpoint)
                    a = sigma_t / sigma_s, b = -alpha_t (e^-h - 1), c = b / (2 r0)
                    alpha = 1 - sigma, lambda = log alpha - log sigma, h = lambda_t - lambda_s,
                    r0 = h_prev / h; c = 0 for a first-order step.

The first DPM step is first order (no previous data prediction). The last is first order too, for
every N: diffusers lowers the final step when `final_sigmas_type == "zero"` (sigma_t = 0 makes h
infinite), which also covers its `lower_order_final and N < 15` rule; that rule only changes a
middle step for solver_order 3. The last step therefore returns the data prediction m exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

NUM_TRAIN_TIMESTEPS = 1000
SCHEDULERS = ("flow_dpm_solver", "flow_euler")


def flow_shift(sigma, shift: float):
    """The SANA / SD3 time shift s*sigma / (1 + (s - 1)*sigma), on NumPy or JAX arrays (same
    dtype as `sigma`; Python floats give float64 NumPy)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
    """A sampling schedule of N steps, as host NumPy arrays.

    sigmas: float32 [N + 1], decreasing, sigmas[-1] = 0 (x at step i has noise level sigmas[i]).
    timesteps: float32 [N], what the model sees at step i (diffusers' `scheduler.timesteps`).
    scheduler: "flow_euler" or "flow_dpm_solver".
    """

    sigmas: np.ndarray
    timesteps: np.ndarray
    scheduler: str

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def _euler_sigma_min(shift: float, num_train_timesteps: int) -> float:
    # diffusers' __init__: the training table in torch float32, shifted, and its smallest entry
    # read back with .item(); replicated here in NumPy float32 (same IEEE operations).
    t = np.float32(1.0)
    sigma = t / np.float32(num_train_timesteps)
    shifted = np.float32(shift) * sigma / (np.float32(1.0) + np.float32(shift - 1.0) * sigma)
    return float(np.float32(shifted))


def flow_euler_schedule(
    num_steps: int, shift: float = 3.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> FlowSchedule:
    """Sigmas and timesteps of `FlowMatchEulerDiscreteScheduler(shift).set_timesteps(num_steps)`,
    including its double shift of sigma_min (see the module docstring)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigma_max, sigma_min = 1.0, _euler_sigma_min(shift, num_train_timesteps)
    ts = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
    sigmas = flow_shift(ts / num_train_timesteps, shift).astype(np.float32)
    timesteps = sigmas * np.float32(num_train_timesteps)
    sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
    return FlowSchedule(sigmas=sigmas, timesteps=timesteps, scheduler="flow_euler")


def flow_dpm_solver_schedule(
    num_steps: int, shift: float = 3.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> FlowSchedule:
    """Sigmas and (integer-valued) timesteps of `DPMSolverMultistepScheduler(flow_shift=shift,
    use_flow_sigmas=True, prediction_type="flow_prediction").set_timesteps(num_steps)`."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    alphas = np.linspace(1, 1 / num_train_timesteps, num_steps + 1)
    sigmas = np.flip(flow_shift(1.0 - alphas, shift))[:-1].copy()
    timesteps = (sigmas * num_train_timesteps).astype(np.int64).astype(np.float32)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return FlowSchedule(sigmas=sigmas, timesteps=timesteps, scheduler="flow_dpm_solver")


def make_schedule(scheduler: str, num_steps: int, shift: float = 3.0) -> FlowSchedule:
    """`flow_euler_schedule` or `flow_dpm_solver_schedule` by name."""
    if scheduler == "flow_euler":
        return flow_euler_schedule(num_steps, shift)
    if scheduler == "flow_dpm_solver":
        return flow_dpm_solver_schedule(num_steps, shift)
    raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {SCHEDULERS}")


def dpm_solver_orders(num_steps: int) -> np.ndarray:
    """int32 [N]: the order (1 or 2) diffusers' 2M solver uses at each step with
    final_sigmas_type="zero": 1 at the first and the last step, 2 elsewhere."""
    orders = np.full(num_steps, 2, np.int32)
    orders[0] = 1
    orders[-1] = 1
    return orders


def dpm_solver_coefficients(sigmas: np.ndarray) -> np.ndarray:
    """float32 [N, 3]: (a, b, c) of each DPM-Solver++(2M) step for the N + 1 `sigmas`, so that
    x_next = a x + b m + c (m - m_prev) (see the module docstring). Computed in float64."""
    s = np.asarray(sigmas, np.float64)
    n = len(s) - 1
    orders = dpm_solver_orders(n)
    with np.errstate(divide="ignore"):
        lam = np.log(1.0 - s) - np.log(s)  # +inf at sigma = 0
    coeffs = np.zeros((n, 3), np.float64)
    for i in range(n):
        if s[i + 1] == 0.0:  # sigma_t = 0: h = inf, e^-h = 0 -> x' = m
            coeffs[i] = (0.0, 1.0, 0.0)
            continue
        h = lam[i + 1] - lam[i]
        a = s[i + 1] / s[i]
        b = -(1.0 - s[i + 1]) * np.expm1(-h)
        c = 0.0
        if orders[i] == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            c = 0.5 * b / r0
        coeffs[i] = (a, b, c)
    return coeffs.astype(np.float32)


def flow_euler_step(x: Array, v: Array, sigma: Array, sigma_next: Array) -> Array:
    """x + (sigma_next - sigma) v. x, v: float32 [...]; sigma, sigma_next: float32 scalars."""
    return x + (sigma_next - sigma) * v


def dpm_solver_step(
    x: Array, v: Array, m_prev: Array, sigma: Array, coeffs: Array
) -> tuple[Array, Array]:
    """One DPM-Solver++(2M) step in flow parametrisation.

    x, v, m_prev: float32 [...] (m_prev is the previous step's data prediction; ignored when
    coeffs[2] = 0, e.g. zeros at the first step); sigma: float32 scalar (the current noise
    level); coeffs: float32 [3] = (a, b, c) from `dpm_solver_coefficients`.
    Returns (x_next, m) where m = x - sigma v is this step's data prediction.
    """
    m = x - sigma * v
    a, b, c = coeffs[0], coeffs[1], coeffs[2]
    return a * x + b * m + c * (m - m_prev), m


def solve(
    velocity: Callable[[Array, Array], Array],
    x: Array,
    schedule: FlowSchedule,
) -> Array:
    """Run the whole sampler with `lax.scan` over the static schedule (jit-friendly).

    velocity: (x float32 [...], timestep float32 scalar) -> v float32 [...] (guidance, if any,
    already applied). x: float32 initial noise [...]. Returns float32 [...], the sample at
    sigma = 0.
    """
    sig = jnp.asarray(schedule.sigmas)
    ts = jnp.asarray(schedule.timesteps)
    if schedule.scheduler == "flow_euler":

        def euler_body(x, xs):
            t, s, s_next = xs
            return flow_euler_step(x, velocity(x, t), s, s_next), None

        x, _ = jax.lax.scan(euler_body, x, (ts, sig[:-1], sig[1:]))
        return x
    if schedule.scheduler == "flow_dpm_solver":
        coeffs = jnp.asarray(dpm_solver_coefficients(schedule.sigmas))

        def dpm_body(carry, xs):
            x, m_prev = carry
            t, s, cf = xs
            return dpm_solver_step(x, velocity(x, t), m_prev, s, cf), None

        (x, _), _ = jax.lax.scan(dpm_body, (x, jnp.zeros_like(x)), (ts, sig[:-1], coeffs))
        return x
    raise ValueError(f"unknown scheduler {schedule.scheduler!r}; expected one of {SCHEDULERS}")
