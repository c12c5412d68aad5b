"""Scheduled retraining: `run.py --schedule "CRON"` runs the same command on a schedule.

On an orchestrator that supports schedules (Kubernetes, Vertex, SageMaker, ...) this registers a ZenML
Schedule with the pipeline. The local orchestrator has none, so there it installs a crontab entry that
runs the exact CLI command again (same python, project folder, config and overrides, and the environment
that selects the ZenML store and recipe), appending its output to outputs/schedules/<name>.log. Each entry
is tagged `# llmtune-schedule:<name>`; the CLI lists and removes them, and leaves other crontab lines alone.
ZenML's step cache makes a run on unchanged data and config a cache hit from end to end.

Example:
    >>> crontab_line("finetune-0a1b2c3d", "0 3 * * 1", "cd /srv/llmtune && python run.py")
    '0 3 * * 1 cd /srv/llmtune && python run.py  # llmtune-schedule:finetune-0a1b2c3d'
    >>> parse_entry(crontab_line("nightly", "@daily", "python run.py"))
    CronEntry(name='nightly', cron='@daily', command='python run.py')
    >>> without_schedule_options(["--pipeline", "finetune", "--schedule", "0 3 * * *", "--set", "a.b=1"])
    ['--pipeline', 'finetune', '--set', 'a.b=1']
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune.errors import LlmtuneError

ROOT = Path(__file__).resolve().parents[1]
MARKER = "  # llmtune-schedule:"
# What a cron job needs to find the same ZenML store, recipe and caches. Never tokens or keys: the crontab
# is plain text; a scheduled run reads secrets the way an interactive one does.
CARRIED_ENV = ("ZENML_CONFIG_PATH", "ZENML_REPOSITORY_PATH", "LLMTUNE_RECIPE", "HF_HOME", "HF_HUB_OFFLINE")
_CRON_FIELD = re.compile(r"^[0-9A-Za-z*/,\-]+$")
_CRON_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


class ScheduleError(LlmtuneError, ValueError):
    """A bad cron expression, or no way to schedule here; the message says what to do."""


@dataclass(frozen=True)
class CronEntry:
    name: str
    cron: str
    command: str


def check_cron(expression: str) -> str:
    """The expression, if it has cron's five fields (or is a macro like @daily); else ScheduleError."""
    fields = expression.split()
    if expression.strip() in _CRON_MACROS or (len(fields) == 5 and all(_CRON_FIELD.match(f) for f in fields)):
        return " ".join(fields)
    raise ScheduleError(
        f"'{expression}' is not a cron expression: use five fields 'minute hour day month weekday', "
        "e.g. '0 3 * * *' (every day at 03:00), or @daily / @weekly."
    )


def without_schedule_options(argv: list[str]) -> list[str]:
    """The CLI arguments minus `--schedule CRON`: what the scheduled job runs."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--schedule":
            skip = True
        elif not arg.startswith("--schedule="):
            kept.append(arg)
    return kept


def schedule_name(pipeline: str, argv: list[str], started_in: Path = ROOT) -> str:
    """A stable name per command (and folder it runs in), so scheduling the same command again replaces its entry."""
    command = shlex.join(argv) if started_in == ROOT else f"{started_in}: {shlex.join(argv)}"
    return f"{pipeline}-{hashlib.sha1(command.encode()).hexdigest()[:8]}"


def cron_command(argv: list[str], env: Mapping[str, str], name: str, started_in: Path = ROOT) -> str:
    """The shell command the crontab entry runs: same interpreter, folder, arguments and store.

    It starts in the folder the schedule was made from, so relative --config and --set paths mean the same.
    """
    carried = " ".join(f"{key}={shlex.quote(env[key])}" for key in CARRIED_ENV if env.get(key))
    log = ROOT / "outputs" / "schedules" / f"{name}.log"
    run = f"{shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'run.py'))} {shlex.join(argv)}"
    return (
        f"cd {shlex.quote(str(started_in))} && mkdir -p {shlex.quote(str(log.parent))} && {carried} {run} >> "
        f"{shlex.quote(str(log))} 2>&1"
    )


def crontab_line(name: str, cron: str, command: str) -> str:
    return f"{cron} {command}{MARKER}{name}"


def parse_entry(line: str) -> CronEntry | None:
    """The entry of one crontab line, or None for lines this project did not write."""
    if MARKER not in line or line.lstrip().startswith("#"):
        return None
    body, name = line.rsplit(MARKER, 1)
    fields = body.split(None, 1 if body.startswith("@") else 5)
    cron_fields = 1 if body.startswith("@") else 5
    return CronEntry(name=name.strip(), cron=" ".join(fields[:cron_fields]), command=fields[cron_fields])


# --- the user's crontab ----------------------------------------------------------------------------------------


def _crontab_binary() -> str:
    found = shutil.which("crontab")
    if not found:
        raise ScheduleError(
            "The local orchestrator has no scheduler, so schedules use cron, and the `crontab` command is "
            "missing. Install cron (Debian/Ubuntu: apt-get install cron), or use a stack whose orchestrator "
            "supports schedules (see infrastructure/)."
        )
    return found


def read_crontab() -> list[str]:
    result = subprocess.run([_crontab_binary(), "-l"], capture_output=True, text=True, check=False)
    if result.returncode != 0:  # "no crontab for <user>" is the only expected failure
        return []
    return result.stdout.splitlines()


def write_crontab(lines: list[str]) -> None:
    text = "".join(f"{line}\n" for line in lines)
    subprocess.run([_crontab_binary(), "-"], input=text, text=True, check=True, capture_output=True)


def cron_entries() -> list[CronEntry]:
    return [entry for line in read_crontab() if (entry := parse_entry(line))]


def install_cron_entry(name: str, cron: str, command: str) -> None:
    """Add the entry, replacing an older one of the same name; other lines stay as they are."""
    if "%" in command:  # cron turns % into a newline
        raise ScheduleError("A scheduled command cannot contain '%' (cron reads it as a newline); remove it.")
    kept = [line for line in read_crontab() if (parse_entry(line) or CronEntry("", "", "")).name != name]
    write_crontab([*kept, crontab_line(name, cron, command)])


def remove_cron_entry(name: str) -> bool:
    lines = read_crontab()
    kept = [line for line in lines if (parse_entry(line) or CronEntry("", "", "")).name != name]
    if len(kept) == len(lines):
        return False
    write_crontab(kept)
    return True


# --- what the CLI calls ----------------------------------------------------------------------------------------


def install(pipeline: str, cfg: Any, cron: str, argv: list[str], started_in: Path = ROOT) -> int:
    """Schedule the command `run.py <argv>` (argv without --schedule), run from `started_in`, on the active stack;
    print what was done."""
    from cli.stack import orchestrator_supports_schedules, use_project_stack

    cron = check_cron(cron)
    name = schedule_name(pipeline, argv, started_in)
    use_project_stack()
    if orchestrator_supports_schedules():
        _register_zenml_schedule(pipeline, cfg, cron, name)
        print(f"Registered ZenML schedule '{name}' ({cron}) with the stack's orchestrator.")
    else:
        install_cron_entry(name, cron, cron_command(argv, os.environ, name, started_in))
        print(f"Installed crontab entry '{name}' ({cron}): python run.py {shlex.join(argv)}")
        print(f"  log: outputs/schedules/{name}.log")
        for warning in cron_warnings():
            print(f"warning: {warning}")
    print(f"  list: python run.py --list-schedules    remove: python run.py --remove-schedule {name}")
    return 0


def _register_zenml_schedule(pipeline: str, cfg: Any, cron: str, name: str) -> None:
    import importlib

    from zenml.config.schedule import Schedule

    from cli.stack import run_options

    definition = getattr(importlib.import_module(f"pipelines.{pipeline}"), pipeline)
    definition.with_options(schedule=Schedule(name=name, cron_expression=cron), **run_options())(
        config=cfg.model_dump()
    )


def cron_daemon_running() -> bool | None:
    """Whether a cron daemon (cron, crond) runs on this machine; None where that cannot be seen (no /proc)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    for comm in proc.glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() in ("cron", "crond"):
                return True
        except OSError:  # the process ended while we looked
            continue
    return False


def cron_warnings() -> list[str]:
    """What keeps crontab entries from running here: no cron installed, or its daemon not running."""
    if not shutil.which("crontab"):
        return [
            "cron is not installed here (no `crontab` command), so crontab schedules can be neither listed nor "
            "installed. Install it (Debian/Ubuntu: apt-get install cron), or use a stack whose orchestrator "
            "schedules runs."
        ]
    if cron_daemon_running() is False:
        return [
            "the cron daemon is not running, so crontab entries will not run until it starts "
            "(Debian/Ubuntu: service cron start)."
        ]
    return []


def list_schedules() -> int:
    """Print the crontab entries this project installed and the ZenML schedules in the store."""
    entries = cron_entries() if shutil.which("crontab") else []
    for entry in entries:
        print(f"{entry.name}  cron  {entry.cron}  {entry.command}")
    for warning in cron_warnings():
        print(f"warning: {warning}")
    zenml_schedules = _zenml_schedules()
    for schedule in zenml_schedules:
        print(f"{schedule.name}  zenml  {schedule.cron_expression}  pipeline {schedule.pipeline_id}")
    if not entries and not zenml_schedules:
        print("No schedules. Add one: python run.py --pipeline finetune --schedule '0 3 * * *'")
    return 0


def remove_schedule(name: str) -> int:
    if shutil.which("crontab") and remove_cron_entry(name):
        print(f"Removed crontab entry '{name}'.")
        return 0
    if any(s.name == name for s in _zenml_schedules()):
        from zenml.client import Client

        Client().delete_schedule(name)
        print(f"Deleted ZenML schedule '{name}' (check the orchestrator's console that its job is gone too).")
        return 0
    print(f"error: no schedule named '{name}'; see python run.py --list-schedules", file=sys.stderr)
    return 2


def _zenml_schedules() -> list[Any]:
    from zenml.client import Client

    return list(Client().list_schedules(size=100).items)
