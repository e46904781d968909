"""A parameter sweep to run with ``taskplex map``: the resonance curve of a driven, damped oscillator.

Each task integrates the Duffing equation

    x'' + 2 * damping * x' + x + nonlinearity * x**3 = force * cos(omega * t)

from rest with a fourth-order Runge-Kutta scheme in plain Python (a few milliseconds per call), lets
the transient die out, and measures the steady state over the last ``periods`` drive periods.

With ``nonlinearity=0`` the oscillator is linear and the measured amplitude must match the textbook
result ``force / sqrt((1 - omega**2)**2 + (2 * damping * omega)**2)``, which each result carries as
``linear_theory_amplitude``: a check that the numbers are right. With ``nonlinearity > 0`` the
resonance peak bends towards higher frequencies (a hardening spring).

Run it (from the repository root)::

    taskplex map examples/sweep.py:simulate --inputs examples/sweep.jsonl --output results.jsonl
"""

from __future__ import annotations

import math

TRANSIENT_DECAY_TIMES = 8.0
"""Integrate this many decay times (1 / damping) before measuring: the transient is then e**-8."""
MIN_STEPS_PER_PERIOD = 8
"""Fewer RK4 steps per drive period than this would not resolve the motion."""


def simulate(
    omega: float,
    damping: float,
    nonlinearity: float = 0.0,
    *,
    force: float = 0.3,
    periods: int = 10,
    steps_per_period: int = 64,
) -> dict[str, float]:
    """Integrate one oscillator and summarise its steady state.

    Returns the inputs, the steady-state ``amplitude`` (largest displacement) and ``mean_energy``,
    the ``phase_lag`` of the response behind the drive (radians, from the Fourier component at the
    drive frequency), the ``linear_theory_amplitude`` and the number of integration ``steps``.
    """
    if omega <= 0 or damping <= 0 or periods < 1 or steps_per_period < MIN_STEPS_PER_PERIOD:
        raise ValueError(
            f"need omega > 0, damping > 0, periods >= 1 and "
            f"steps_per_period >= {MIN_STEPS_PER_PERIOD}; got "
            f"omega={omega}, damping={damping}, periods={periods}, "
            f"steps_per_period={steps_per_period}"
        )
    period = 2.0 * math.pi / omega
    dt = period / steps_per_period
    transient_periods = math.ceil(TRANSIENT_DECAY_TIMES / damping / period)

    def acceleration(t: float, x: float, v: float) -> float:
        return force * math.cos(omega * t) - 2.0 * damping * v - x - nonlinearity * x**3

    t = x = v = 0.0
    steps = 0
    amplitude = energy_sum = in_phase = quadrature = 0.0
    measured_steps = periods * steps_per_period
    for step in range((transient_periods + periods) * steps_per_period):
        # Classic RK4 on the first-order system (x, v).
        k1x, k1v = v, acceleration(t, x, v)
        k2x, k2v = v + 0.5 * dt * k1v, acceleration(t + 0.5 * dt, x + 0.5 * dt * k1x, v + 0.5 * dt * k1v)
        k3x, k3v = v + 0.5 * dt * k2v, acceleration(t + 0.5 * dt, x + 0.5 * dt * k2x, v + 0.5 * dt * k2v)
        k4x, k4v = v + dt * k3v, acceleration(t + dt, x + dt * k3x, v + dt * k3v)
        x += dt / 6.0 * (k1x + 2.0 * k2x + 2.0 * k3x + k4x)
        v += dt / 6.0 * (k1v + 2.0 * k2v + 2.0 * k3v + k4v)
        t += dt
        steps += 1
        if step >= transient_periods * steps_per_period:
            amplitude = max(amplitude, abs(x))
            energy_sum += 0.5 * v * v + 0.5 * x * x + 0.25 * nonlinearity * x**4
            in_phase += x * math.cos(omega * t)
            quadrature += x * math.sin(omega * t)
    return {
        "omega": omega,
        "damping": damping,
        "nonlinearity": nonlinearity,
        "amplitude": amplitude,
        "mean_energy": energy_sum / measured_steps,
        "phase_lag": math.atan2(quadrature, in_phase),
        "linear_theory_amplitude": force / math.hypot(1.0 - omega**2, 2.0 * damping * omega),
        "steps": steps,
    }
