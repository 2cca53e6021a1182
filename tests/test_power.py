"""The AC-power and idle probes, on captured outputs of pmset, ioreg and sysfs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from palate.runtime.power import (
    Probes,
    parse_ioreg_idle,
    parse_pmset_batt,
    parse_power_supply,
    read_power_supply,
)

PMSET_AC = """Now drawing from 'AC Power'
 -InternalBattery-0 (id=4653155)	100%; charged; 0:00 remaining present: true
"""
PMSET_BATTERY = """Now drawing from 'Battery Power'
 -InternalBattery-0 (id=4653155)	87%; discharging; 5:12 remaining present: true
"""
PMSET_UPS = "Now drawing from 'UPS Power'\n -CyberPower (id=1)\t90%; discharging\n"
PMSET_DESKTOP = "Now drawing from 'AC Power'\n"  # a Mac mini: no battery line at all

IOREG = """+-o IOHIDSystem  <class IOHIDSystem, id 0x100000465, registered, matched, active>
    {
      "IOClass" = "IOHIDSystem"
      "HIDIdleTime" = 4180000000
      "HIDParameters" = {"HIDKeyRepeat"=83333333}
    }
"""


def test_pmset() -> None:
    assert parse_pmset_batt(PMSET_AC).on_ac is True
    assert parse_pmset_batt(PMSET_DESKTOP).on_ac is True
    bat = parse_pmset_batt(PMSET_BATTERY)
    assert bat.on_ac is False and "Battery Power" in bat.detail
    assert parse_pmset_batt(PMSET_UPS).on_ac is False
    assert parse_pmset_batt("").on_ac is None
    assert parse_pmset_batt("pmset: something odd\n").on_ac is None


def test_ioreg_idle() -> None:
    assert parse_ioreg_idle(IOREG).seconds == 4.18
    assert parse_ioreg_idle("+-o IOHIDSystem\n").seconds is None


def test_linux_power_supply_decisions() -> None:
    laptop_ac = {
        "AC": {"type": "Mains\n", "online": "1\n"},
        "BAT0": {"type": "Battery\n", "status": "Charging\n"},
    }
    laptop_bat = {
        "AC": {"type": "Mains\n", "online": "0\n"},
        "BAT0": {"type": "Battery\n", "status": "Discharging\n"},
    }
    usb_c = {
        "ucsi-source-psy-USBC000:001": {"type": "USB\n", "online": "1\n"},
        "ADP1": {"type": "Mains\n", "online": "0\n"},
        "BAT1": {"type": "Battery\n", "status": "Charging\n"},
    }
    battery_only = {"BAT0": {"type": "Battery", "status": "Discharging"}}
    hid_battery = {"hid-mouse-battery": {"type": "Battery", "status": "Full"}}
    assert parse_power_supply(laptop_ac).on_ac is True
    off = parse_power_supply(laptop_bat)
    assert off.on_ac is False and "AC offline" in off.detail
    assert parse_power_supply(usb_c).on_ac is True
    assert parse_power_supply(battery_only).on_ac is False
    unknown = parse_power_supply({})
    assert unknown.on_ac is None and "no /sys/class/power_supply" in unknown.detail
    assert parse_power_supply(hid_battery).on_ac is None  # a wireless mouse is not the host


def test_sysfs_reader_and_probes(tmp_path: Path) -> None:
    for name, files in {
        "AC": {"type": "Mains\n", "online": "0\n"},
        "BAT0": {"type": "Battery\n", "status": "Discharging\n"},
    }.items():
        (tmp_path / name).mkdir()
        for f, v in files.items():
            (tmp_path / name / f).write_text(v)
    assert read_power_supply(tmp_path)["AC"] == {"type": "Mains\n", "online": "0\n"}
    assert read_power_supply(tmp_path / "missing") == {}
    linux = Probes("linux", sysfs=tmp_path)
    assert linux.power().on_ac is False
    idle = linux.idle()
    assert idle.seconds is None and "skipped" in idle.detail


def test_macos_probes_run_pmset_and_ioreg() -> None:
    calls: list[list[str]] = []

    def read(argv: Sequence[str]) -> str | None:
        calls.append(list(argv))
        return {"pmset": PMSET_BATTERY, "ioreg": IOREG}[argv[0]]

    mac = Probes("darwin", read=read)
    assert mac.power().on_ac is False
    assert mac.idle().seconds == 4.18
    assert calls == [["pmset", "-g", "batt"], ["ioreg", "-c", "IOHIDSystem"]]
    broken = Probes("darwin", read=lambda argv: None)
    assert broken.power().on_ac is None and broken.idle().seconds is None
