"""The options of the hpc backend, checked at construction with a message that says what is wrong."""

from __future__ import annotations

import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from taskplex import InvalidOption
from taskplex_hpc.cluster import parse_slurm_time

__all__ = ["DEFAULT_TEMPLATE", "MIN_PILOT_WALLTIME", "QUEUE_TYPES", "Options"]

MIN_PILOT_WALLTIME = 60.0
"""Slurm's time limits are whole minutes."""

QUEUE_TYPES = ("slurm",)
"""Batch systems whose job endings this backend can read (pysqa submits to more)."""

DEFAULT_TEMPLATE = """\
#!/bin/bash
#SBATCH --job-name={{job_name}}
#SBATCH --chdir={{working_directory}}
#SBATCH --output={{output}}
#SBATCH --no-requeue
#SBATCH --ntasks=1
#SBATCH --cpus-per-task={{cores}}
{%- if time_limit %}
#SBATCH --time={{time_limit}}
{%- endif %}
{%- if memory_mb %}
#SBATCH --mem={{memory_mb}}M
{%- endif %}
{%- if gpus %}
#SBATCH --gpus={{gpus}}
{%- endif %}
{%- if partition %}
#SBATCH --partition={{partition}}
{%- endif %}
{%- if account %}
#SBATCH --account={{account}}
{%- endif %}
{%- for option in sbatch_options %}
#SBATCH {{option}}
{%- endfor %}

{{command}}
"""
"""The submission script when neither ``template`` nor ``config_path`` is given.

One task is one process with ``cores`` CPUs (``--cpus-per-task``, not ``--ntasks``: a Python
function is one process). ``--no-requeue``: when a node fails, Slurm reports NODE_FAIL and the
task's ``retries`` decide, instead of Slurm silently running the job again.
"""


@dataclass(frozen=True)
class Options:
    """The checked options of one backend."""

    workdir: Path
    interval: float
    queue_type: str
    template: str | None
    config_path: Path | None
    cluster: str | None
    queue: str | None
    cores: int
    memory: int | None
    walltime: float | None
    gpus: int
    account: str | None
    sbatch_options: tuple[str, ...]
    python: str
    job_name: str
    command_timeout: float
    result_grace: float
    prefetch: int | None
    """None: none for one job per task, ``workers`` slots of tickets when packing."""
    pack: bool
    pilot_cores: int | None
    pilot_walltime: float
    pilot_idle: float

    @classmethod
    def check(
        cls,
        *,
        workdir: str | os.PathLike[str],
        interval: float,
        queue_type: str,
        template: str | None,
        config_path: str | os.PathLike[str] | None,
        cluster: str | None,
        queue: str | None,
        cores: int,
        memory: int | None,
        walltime: float | str | None,
        gpus: int,
        account: str | None,
        sbatch_options: Sequence[str],
        python: str | os.PathLike[str] | None,
        job_name: str,
        command_timeout: float,
        result_grace: float,
        prefetch: int | None,
        pack: bool,
        pilot_cores: int | None,
        pilot_walltime: float | str,
        pilot_idle: float,
    ) -> Options:
        if not isinstance(workdir, str | os.PathLike):
            raise InvalidOption(f"workdir must be a path on a shared filesystem, got {workdir!r}")
        for name, value in (
            ("interval", interval),
            ("command_timeout", command_timeout),
            ("result_grace", result_grace),
            ("pilot_idle", pilot_idle),
        ):
            if not _positive(value):
                raise InvalidOption(f"{name} must be a number of seconds > 0, got {value!r}")
        if not isinstance(queue_type, str) or queue_type.lower() not in QUEUE_TYPES:
            raise InvalidOption(
                f"queue_type={queue_type!r} is not supported; supported: {', '.join(QUEUE_TYPES)}"
            )
        if template is not None and (not isinstance(template, str) or not template.strip()):
            raise InvalidOption(f"template must be the text of a submission script, got {template!r}")
        config = None if template is not None else _config_directory(config_path, queue_type.lower())
        for name, text in (("cluster", cluster), ("queue", queue), ("account", account)):
            if text is not None and (not isinstance(text, str) or not text or text != text.strip()):
                raise InvalidOption(f"{name} must be a non-empty name or None, got {text!r}")
        if cluster is not None and config is None:
            raise InvalidOption(
                "cluster selects a cluster of a pysqa clusters.yaml: give config_path too"
            )
        if not _int_at_least(cores, 1):
            raise InvalidOption(f"cores must be an int >= 1, got {cores!r}")
        if not _int_at_least(gpus, 0):
            raise InvalidOption(f"gpus must be an int >= 0, got {gpus!r}")
        if memory is not None and not _int_at_least(memory, 1):
            raise InvalidOption(f"memory is in megabytes (an int > 0) or None, got {memory!r}")
        seconds = _walltime(walltime)
        if prefetch is not None and not _int_at_least(prefetch, 0):
            raise InvalidOption(
                f"prefetch must be an int >= 0 (slots launched ahead) or None, got {prefetch!r}"
            )
        if not isinstance(pack, bool):
            raise InvalidOption(f"pack must be True or False, got {pack!r}")
        if pilot_cores is not None and not _int_at_least(pilot_cores, 1):
            raise InvalidOption(f"pilot_cores must be an int >= 1 or None, got {pilot_cores!r}")
        pilot_seconds = _walltime(pilot_walltime)
        if pilot_seconds is None or pilot_seconds < MIN_PILOT_WALLTIME:
            raise InvalidOption(
                f"pilot_walltime must be at least {MIN_PILOT_WALLTIME:g} s, got {pilot_walltime!r}"
            )
        if isinstance(sbatch_options, str) or not all(
            isinstance(option, str) and option.startswith("-") and "\n" not in option
            for option in sbatch_options
        ):
            raise InvalidOption(
                f"sbatch_options must be a list of sbatch options such as ['--qos=debug'], "
                f"got {sbatch_options!r}"
            )
        if not isinstance(job_name, str) or not job_name or not job_name.replace("-", "").isalnum():
            raise InvalidOption(f"job_name must be letters, digits and dashes, got {job_name!r}")
        return cls(
            workdir=Path(workdir).absolute(),
            interval=float(interval),
            queue_type=queue_type.lower(),
            template=template,
            config_path=config,
            cluster=cluster,
            queue=queue,
            cores=cores,
            memory=memory,
            walltime=seconds,
            gpus=gpus,
            account=account,
            sbatch_options=tuple(sbatch_options),
            python=_interpreter(python),
            job_name=job_name,
            command_timeout=float(command_timeout),
            result_grace=float(result_grace),
            prefetch=prefetch,
            pack=pack,
            pilot_cores=pilot_cores,
            pilot_walltime=pilot_seconds,
            pilot_idle=float(pilot_idle),
        )


def _positive(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and value > 0
        and math.isfinite(value)
    )


def _int_at_least(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _walltime(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            seconds = parse_slurm_time(value)
        except ValueError:
            seconds = None
        if seconds is None or seconds <= 0:
            raise InvalidOption(
                f"walltime {value!r} is not a Slurm time such as '1:30:00' or '2-00:00:00'"
            )
        return seconds
    if not _positive(value):
        raise InvalidOption(
            f"walltime must be seconds (> 0), a Slurm time string, or None, got {value!r}"
        )
    return float(value)  # type: ignore[arg-type]


def _config_directory(path: object, queue_type: str) -> Path | None:
    """The pysqa configuration directory, or None for the built-in template."""
    if path is None:
        return None
    if not isinstance(path, str | os.PathLike):
        raise InvalidOption(f"config_path must be a directory, got {path!r}")
    directory = Path(path).absolute()
    # ropt's layout keeps one subdirectory per queue type
    for candidate in (directory, directory / queue_type):
        if (candidate / "queue.yaml").is_file() or (candidate / "clusters.yaml").is_file():
            return candidate
    raise InvalidOption(
        f"config_path={os.fspath(path)!r} has no queue.yaml or clusters.yaml "
        f"(nor has its subdirectory {queue_type!r})"
    )


def _interpreter(python: object) -> str:
    if python is None:
        if not sys.executable:
            raise InvalidOption("python: this interpreter does not know its own path; pass python=")
        return sys.executable
    if not isinstance(python, str | os.PathLike):
        raise InvalidOption(f"python must be the path of the interpreter jobs run, got {python!r}")
    name = os.fspath(python)
    found = shutil.which(name) if isinstance(name, str) else None
    if found is None:
        raise InvalidOption(f"python={name!r}: no such interpreter (jobs run it on the compute nodes)")
    return os.path.abspath(found)
