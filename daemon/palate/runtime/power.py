"""Is the machine on mains power, and how long has the user been away?

The scheduler asks these before a nightly training run (a run makes a laptop warm and
drains a battery in minutes). Each probe is a pure parser over what the OS prints or
exposes, tested on captured samples, plus a thin reader that fetches that text. Any
failure to read yields *unknown*, never an exception: an unknown power source allows
training (desktops and VMs often expose nothing) and an unknown idle time skips the
check, and both are reported so the user sees why.

Sources (docs/operations.md): macOS ``pmset -g batt`` (first line names the source) and
``ioreg -c IOHIDSystem`` (``HIDIdleTime`` in nanoseconds); Linux
``/sys/class/power_supply/*/{type,online,status}``. Linux has no portable idle signal
for a background process (X11, Wayland and the console all differ), so idle is unknown.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Reads a command's stdout, or None if it cannot run; injectable for tests.
ReadCommand = Callable[[Sequence[str]], str | None]

SYSFS_POWER = Path("/sys/class/power_supply")
#: sysfs supply types that mean "external power" when online. USB-C/PD ports are how
#: most current laptops charge; a USB type with online=1 is a charger, not a mouse.
EXTERNAL_TYPES = frozenset({"Mains", "USB", "USB_C", "USB_PD", "USB_PD_DRP", "Wireless"})


@dataclass(frozen=True)
class PowerState:
    """``on_ac`` is True/False, or None when the source cannot be told."""

    on_ac: bool | None
    detail: str


@dataclass(frozen=True)
class IdleState:
    """Seconds since the last keyboard/mouse input, or None where unknown."""

    seconds: float | None
    detail: str


def parse_pmset_batt(output: str) -> PowerState:
    """Parse ``pmset -g batt``; its first line is ``Now drawing from 'AC Power'`` or
    ``'Battery Power'`` (``'UPS Power'`` on a UPS, which is a battery too)."""
    first = output.strip().splitlines()[0] if output.strip() else ""
    m = re.search(r"drawing from '([^']+)'", first)
    if not m:
        return PowerState(None, f"pmset printed no power source ({first[:80]!r})")
    source = m.group(1)
    if source == "AC Power":
        return PowerState(True, "on AC power (pmset)")
    return PowerState(False, f"on {source} (pmset)")


def parse_power_supply(supplies: Mapping[str, Mapping[str, str]]) -> PowerState:
    """Decide from sysfs ``{name: {"type": ..., "online": ..., "status": ...}}``.

    Any external supply online -> AC. External supplies all offline -> battery. No
    external supply listed: a discharging battery says battery, otherwise unknown
    (desktops and VMs often list nothing at all).
    """
    external = {n: s for n, s in supplies.items() if s.get("type", "").strip() in EXTERNAL_TYPES}
    online = sorted(n for n, s in external.items() if s.get("online", "").strip() == "1")
    if online:
        return PowerState(True, f"on AC power ({', '.join(online)} online)")
    if external:
        return PowerState(False, f"on battery ({', '.join(sorted(external))} offline)")
    batteries = {n: s for n, s in supplies.items() if s.get("type", "").strip() == "Battery"}
    if any(s.get("status", "").strip() == "Discharging" for s in batteries.values()):
        return PowerState(False, f"on battery ({', '.join(sorted(batteries))} discharging)")
    if not supplies:
        return PowerState(None, "power source unknown (no /sys/class/power_supply entries)")
    return PowerState(None, f"power source unknown ({', '.join(sorted(supplies))})")


def parse_ioreg_idle(output: str) -> IdleState:
    """``ioreg -c IOHIDSystem`` prints ``"HIDIdleTime" = 123456789`` in nanoseconds."""
    m = re.search(r'"HIDIdleTime"\s*=\s*(\d+)', output)
    if not m:
        return IdleState(None, "idle time unknown (ioreg printed no HIDIdleTime)")
    return IdleState(int(m.group(1)) / 1e9, "HIDIdleTime (ioreg)")


def read_power_supply(root: Path = SYSFS_POWER) -> dict[str, dict[str, str]]:
    """The ``type``, ``online`` and ``status`` files of every supply; missing ones skipped."""
    out: dict[str, dict[str, str]] = {}
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return out
    for entry in entries:
        values: dict[str, str] = {}
        for name in ("type", "online", "status"):
            try:
                values[name] = (entry / name).read_text(encoding="ascii", errors="replace")
            except OSError:
                continue
        if values:
            out[entry.name] = values
    return out


def run_command(argv: Sequence[str], timeout: float = 5.0) -> str | None:
    """stdout of ``argv``, or None if it is missing, fails or hangs."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


class Probes:
    """The live probes for this platform; the scheduler receives one (tests pass fakes)."""

    def __init__(
        self,
        platform: str = sys.platform,
        read: ReadCommand = run_command,
        sysfs: Path = SYSFS_POWER,
    ) -> None:
        self.platform = platform
        self.read = read
        self.sysfs = sysfs

    def power(self) -> PowerState:
        if self.platform == "darwin":
            out = self.read(["pmset", "-g", "batt"])
            if out is None:
                return PowerState(None, "power source unknown (pmset failed)")
            return parse_pmset_batt(out)
        if self.platform.startswith("linux"):
            return parse_power_supply(read_power_supply(self.sysfs))
        return PowerState(None, f"power source unknown on {self.platform}")

    def idle(self) -> IdleState:
        if self.platform == "darwin":
            out = self.read(["ioreg", "-c", "IOHIDSystem"])
            if out is None:
                return IdleState(None, "idle time unknown (ioreg failed)")
            return parse_ioreg_idle(out)
        return IdleState(None, f"idle time is not available on {self.platform}; check skipped")
