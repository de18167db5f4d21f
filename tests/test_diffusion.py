"""Flow-matching samplers (jaxstack/diffusion) against diffusers' schedulers (PyTorch, CPU).

Schedules must be bit-identical to `FlowMatchEulerDiscreteScheduler(shift)` and
`DPMSolverMultistepScheduler(flow_shift, use_flow_sigmas=True, prediction_type=
"flow_prediction")`. Full sampling runs on a fixed analytic velocity field (a random channel-mixing
linear map plus a conditioning vector and a timestep term) are compared with the
`SanaPipeline`-style diffusers loop (batched CFG, negative first, `scheduler.step`): diffusers
computes every step in float32 (it upcasts the sample, so a float64 run there is a float32 run),
our jitted float32 run must agree to max |diff| <= 1e-5 (latents reach |x| ~ 9.5 with guidance
4.5); a float64 NumPy oracle of the spec formulas bounds both to 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxstack.diffusion import (
    cfg_combine,
    dpm_solver_coefficients,
    dpm_solver_orders,
    flow_dpm_solver_schedule,
    flow_euler_schedule,
    guided_velocity,
    initial_latents,
    make_schedule,
    sample,
)

torch = pytest.importorskip("torch")
schedulers = pytest.importorskip("diffusers.schedulers")
# diffusers' DPM scheduler trips NumPy 2's __array__(copy=...) deprecation on every set_timesteps
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")

SHIFTS = (1.0, 1.7, 3.0, 4.0, 6.0)
STEPS = (1, 2, 5, 14, 15, 20, 28)
B, C, H, W = 2, 4, 3, 5
PARITY_ATOL = 1e-5  # jitted float32 vs diffusers' float32 loop (measured <= 3.9e-6, |x| <= 9.5)
ORACLE_ATOL = 1e-5  # float32 (either) vs the float64 NumPy oracle (measured <= 2e-6)


def diffusers_euler(shift: float, n: int):
    s = schedulers.FlowMatchEulerDiscreteScheduler(shift=shift)
    s.set_timesteps(n)
    return s


def diffusers_dpm(shift: float, n: int):
    s = schedulers.DPMSolverMultistepScheduler(
        flow_shift=shift, use_flow_sigmas=True, prediction_type="flow_prediction"
    )
    s.set_timesteps(n)
    return s


# -- schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", SHIFTS)
def test_euler_schedule_equals_diffusers(shift):
    for n in STEPS:
        ours, ref = flow_euler_schedule(n, shift), diffusers_euler(shift, n)
        np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())


@pytest.mark.parametrize("shift", SHIFTS)
def test_dpm_schedule_equals_diffusers(shift):
    for n in STEPS:
        ours, ref = flow_dpm_solver_schedule(n, shift), diffusers_dpm(shift, n)
        np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy().astype(np.float32))


def test_spec_sigma_examples():
    # specs/sana.md section 6, s = 3, N = 5 (printed to 5 significant digits)
    euler = flow_euler_schedule(5, 3.0)
    np.testing.assert_allclose(
        euler.sigmas, [1, 0.90036, 0.75112, 0.50299, 0.00893, 0], atol=6e-6, rtol=0
    )
    np.testing.assert_allclose(euler.timesteps, euler.sigmas[:-1] * 1000, rtol=1e-7)
    dpm = flow_dpm_solver_schedule(5, 3.0)
    np.testing.assert_allclose(
        dpm.sigmas, [0.99967, 0.92272, 0.81781, 0.6663, 0.42827, 0], atol=6e-6, rtol=0
    )
    np.testing.assert_array_equal(dpm.timesteps, [999, 922, 817, 666, 428])  # int(sigma*1000)
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_schedule("ddim", 5)


def test_dpm_orders_first_and_last_steps_first_order():
    # diffusers lowers the last step for every N when final_sigmas_type="zero"
    np.testing.assert_array_equal(dpm_solver_orders(1), [1])
    np.testing.assert_array_equal(dpm_solver_orders(5), [1, 2, 2, 2, 1])
    np.testing.assert_array_equal(dpm_solver_orders(20)[[0, 1, 18, 19]], [1, 2, 2, 1])
    coeffs = dpm_solver_coefficients(flow_dpm_solver_schedule(20, 3.0).sigmas)
    np.testing.assert_array_equal(coeffs[-1], [0, 1, 0])  # x' = m at sigma = 0
    assert coeffs[0, 2] == 0 and np.all(coeffs[1:-1, 2] != 0)


# -- a fixed analytic velocity field -----------------------------------------------------------


def field_params():
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((C, C)) * 0.3).astype(np.float32)
    cond = rng.standard_normal((B, C)).astype(np.float32)
    uncond = rng.standard_normal((B, C)).astype(np.float32)
    x0 = rng.standard_normal((B, C, H, W)).astype(np.float32)
    return a, cond, uncond, x0


def jax_field(a):
    a = jnp.asarray(a)

    def velocity(x, t, c):  # x [B', C, H, W], t [B'], c [B', C]
        return (
            jnp.einsum("dc,bchw->bdhw", a, x)
            + c[:, :, None, None]
            + 0.5 * (t / 1000.0)[:, None, None, None]
        )

    return velocity


def torch_field(a):
    a = torch.from_numpy(a)

    def velocity(x, t, c):
        return (
            torch.einsum("dc,bchw->bdhw", a, x)
            + c[:, :, None, None]
            + 0.5 * (t.to(torch.float32) / 1000.0)[:, None, None, None]
        )

    return velocity


def diffusers_loop(scheduler, a, x0, cond, uncond, guidance):
    """`SanaPipeline.__call__`'s denoising loop on the analytic field."""
    f = torch_field(a)
    x = torch.from_numpy(x0)
    emb = torch.cat([torch.from_numpy(uncond), torch.from_numpy(cond)])  # negative first
    for t in scheduler.timesteps:
        x_in = torch.cat([x] * 2)
        v = f(x_in, t.expand(x_in.shape[0]), emb).float()
        v_u, v_c = v.chunk(2)
        v = v_u + guidance * (v_c - v_u)
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x.numpy()


def oracle_loop(name, n, shift, a, x0, cond, uncond, guidance):
    """Float64 NumPy transcription of specs/sana.md section 6 (schedule from our tables)."""
    sched = make_schedule(name, n, shift)
    s = sched.sigmas.astype(np.float64)
    x = x0.astype(np.float64)

    def vel(x, t):
        def f(c):
            return np.einsum("dc,bchw->bdhw", a, x) + c[:, :, None, None] + 0.5 * t / 1000.0

        v_u, v_c = f(uncond.astype(np.float64)), f(cond.astype(np.float64))
        return v_u + guidance * (v_c - v_u)

    m_prev, h_prev = None, None
    for i in range(n):
        v = vel(x, float(sched.timesteps[i]))
        if name == "flow_euler":
            x = x + (s[i + 1] - s[i]) * v
            continue
        m = x - s[i] * v
        if s[i + 1] == 0:
            x, h = m, None  # alpha_t = 1, e^-h = 0
        else:
            lam = lambda z: np.log(1 - z) - np.log(z)
            h = lam(s[i + 1]) - lam(s[i])
            alpha_t = 1 - s[i + 1]
            x = (s[i + 1] / s[i]) * x - alpha_t * (np.exp(-h) - 1) * m
            if i > 0:  # second order (2M, midpoint)
                d1 = (m - m_prev) / (h_prev / h)
                x = x - 0.5 * alpha_t * (np.exp(-h) - 1) * d1
        m_prev, h_prev = m, h
    return x


@pytest.mark.parametrize("name", ["flow_dpm_solver", "flow_euler"])
@pytest.mark.parametrize("n", [5, 20])
def test_full_sampling_equals_diffusers_loop(name, n):
    a, cond, uncond, x0 = field_params()
    shift, guidance = 3.0, 4.5
    ref = diffusers_euler(shift, n) if name == "flow_euler" else diffusers_dpm(shift, n)
    want = diffusers_loop(ref, a, x0, cond, uncond, guidance)
    got = np.asarray(
        sample(
            jax_field(a),
            jnp.asarray(x0),
            cond=jnp.asarray(cond),
            uncond=jnp.asarray(uncond),
            guidance_scale=guidance,
            steps=n,
            scheduler=name,
            shift=shift,
        )
    )
    oracle = oracle_loop(name, n, shift, a, x0, cond, uncond, guidance)
    scale = float(np.abs(oracle).max())
    assert 0.5 < scale < 50  # O(1) latents, so absolute tolerances are meaningful
    err_diffusers = float(np.abs(got - want).max())
    assert err_diffusers <= PARITY_ATOL, err_diffusers
    assert float(np.abs(got - oracle).max()) <= ORACLE_ATOL
    assert float(np.abs(want - oracle).max()) <= ORACLE_ATOL


def test_cfg_batched_equals_manual_and_negative_first():
    a, cond, uncond, x0 = field_params()
    f = jax_field(a)
    x, t = jnp.asarray(x0), jnp.float32(700.0)
    tb = jnp.full((B,), t)
    manual = f(x, tb, jnp.asarray(uncond)) + 3.0 * (
        f(x, tb, jnp.asarray(cond)) - f(x, tb, jnp.asarray(uncond))
    )
    got = guided_velocity(f, x, t, jnp.asarray(cond), jnp.asarray(uncond), 3.0)
    np.testing.assert_allclose(got, manual, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        cfg_combine(jnp.float32(1.0), jnp.float32(3.0), 4.5), 1.0 + 4.5 * 2.0, rtol=1e-7
    )
    seen = []

    def spy(xx, tt, cc):  # records the batched call: [uncond; cond], 2B rows, one call
        seen.append((xx.shape, tt.shape, np.asarray(cc)))
        return f(xx, tt, cc)

    guided_velocity(spy, x, t, jnp.asarray(cond), jnp.asarray(uncond), 3.0)
    assert len(seen) == 1 and seen[0][0] == (2 * B, C, H, W) and seen[0][1] == (2 * B,)
    np.testing.assert_array_equal(seen[0][2], np.concatenate([uncond, cond]))

    # a sampler run with CFG equals one whose velocity does the guidance by hand
    def manual_fn(xx, tt, cc):
        u, c = cc
        return f(xx, tt, u) + 4.5 * (f(xx, tt, c) - f(xx, tt, u))

    kw = dict(steps=5, scheduler="flow_dpm_solver", shift=3.0)
    with_cfg = sample(f, x, cond=jnp.asarray(cond), uncond=jnp.asarray(uncond), **kw)
    by_hand = sample(manual_fn, x, cond=(jnp.asarray(uncond), jnp.asarray(cond)), **kw)
    np.testing.assert_allclose(with_cfg, by_hand, rtol=1e-5, atol=1e-5)
    # guidance_scale <= 1 (diffusers' do_classifier_free_guidance) -> conditional only
    no_cfg = sample(
        f, x, cond=jnp.asarray(cond), uncond=jnp.asarray(uncond), guidance_scale=1.0, **kw
    )
    np.testing.assert_allclose(no_cfg, sample(f, x, cond=jnp.asarray(cond), **kw), atol=1e-6)


def test_seeds_per_image_independent_of_batch_size():
    key = jax.random.key(7)
    z4 = initial_latents(key, 4, C, H, W)
    z2 = initial_latents(key, 2, C, H, W)
    z_tail = initial_latents(key, 2, C, H, W, start=2)
    assert z4.shape == (4, C, H, W) and z4.dtype == jnp.float32
    np.testing.assert_array_equal(z4[:2], z2)
    np.testing.assert_array_equal(z4[2:], z_tail)
    np.testing.assert_array_equal(
        z4[3], jax.random.normal(jax.random.fold_in(key, 3), (C, H, W), jnp.float32)
    )
    assert not np.allclose(z4[0], z4[1])


def test_sampling_compiles_once():
    a, cond, uncond, x0 = field_params()
    f = jax_field(a)
    traces = []

    def counted(x, t, c):
        traces.append(1)  # runs only while tracing
        return f(x, t, c)

    kw = dict(steps=7, scheduler="flow_euler", shift=3.0)
    outs = []
    for i, g in enumerate((4.5, 2.0, 7.0)):
        x = jnp.asarray(x0) + i
        c = jnp.asarray(cond) * (i + 1)
        outs.append(sample(counted, x, cond=c, uncond=jnp.asarray(uncond), guidance_scale=g, **kw))
    assert len(traces) == 1
    assert not np.allclose(outs[0], outs[1])


class _TinyVelocity(nnx.Module):
    traces: list = []  # appended to while tracing (class attribute, not module state)

    def __init__(self, rngs: nnx.Rngs):
        self.mix = nnx.Linear(C, C, rngs=rngs)

    def __call__(self, x, t, c):
        _TinyVelocity.traces.append(1)
        y = self.mix(jnp.moveaxis(x, 1, -1)) + c[:, None, None, :]
        return jnp.moveaxis(y, -1, 1) * (1.0 - t / 2000.0)[:, None, None, None]


def test_sample_accepts_nnx_module_state_as_argument():
    _, cond, uncond, x0 = field_params()
    model = _TinyVelocity(nnx.Rngs(0))
    kw = dict(cond=jnp.asarray(cond), uncond=jnp.asarray(uncond), steps=5)
    got = sample(model, jnp.asarray(x0), **kw)
    want = sample(lambda x, t, c: model(x, t, c), jnp.asarray(x0), **kw)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # new weights, same graph: no recompilation, a different answer
    model.mix.kernel[...] = model.mix.kernel[...] * 2.0
    traces = len(_TinyVelocity.traces)
    got2 = sample(model, jnp.asarray(x0), **kw)
    assert len(_TinyVelocity.traces) == traces and not np.allclose(got, got2)


def test_sample_rejects_bad_inputs():
    _, cond, _, x0 = field_params()
    f = jax_field(np.eye(C, dtype=np.float32))
    with pytest.raises(ValueError, match="leading dimension"):
        sample(f, jnp.asarray(x0), cond=jnp.asarray(cond[:1]))
    with pytest.raises(ValueError, match="unknown scheduler"):
        sample(f, jnp.asarray(x0), cond=jnp.asarray(cond), scheduler="ddpm")
    with pytest.raises(ValueError, match="steps"):
        sample(f, jnp.asarray(x0), cond=jnp.asarray(cond), steps=0)
