"""setup.py declares every runtime dependency of requirements.txt (except torch) with a range that holds
the tested pin, so ``pip install -e .`` into an environment that already has torch is complete."""

from __future__ import annotations

import ast
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _install_requires() -> list[Requirement]:
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    value = next(k.value for k in call.keywords if k.arg == "install_requires")
    return [Requirement(r) for r in ast.literal_eval(value)]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def test_every_pinned_dependency_but_torch_is_declared_with_a_range_holding_its_pin():
    declared = {canonicalize_name(r.name): r for r in _install_requires()}
    pins = _pins()
    assert "torch" in pins and "torch" not in declared  # torch is installed first, never by pip's resolver
    assert set(declared) == set(pins) - {"torch"}
    for name, pin in pins.items():
        if name == "torch":
            continue
        spec = declared[name].specifier
        assert spec.contains(pin), (name, str(spec), str(pin))
        # a range, not a pin: the next patch release is accepted, the next major (0.x: minor) is not
        nxt = Version(f"{pin.major}.{pin.minor}.{pin.micro + 1}")
        breaking = Version(f"{pin.major + 1}.0.0") if pin.major > 0 else Version(f"0.{pin.minor + 1}.0")
        assert spec.contains(nxt) and not spec.contains(breaking), (name, str(spec))
        if pin.micro:  # the pin is the floor
            assert not spec.contains(Version(f"{pin.major}.{pin.minor}.{pin.micro - 1}")), (name, str(spec))
