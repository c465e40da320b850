"""Results: one table per op family for a person, JSON for machines."""
from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class Result:
    family: str
    name: str
    device: str
    unit: str
    torch_ms: Optional[float] = None
    ours_ms: Optional[float] = None
    rate: Optional[float] = None        # ours, in `unit`
    torch_rate: Optional[float] = None  # torch, in `unit`
    pct_peak: Optional[float] = None    # ours as % of the measured ceiling
    target: Optional[float] = None
    peak_target: Optional[float] = None  # % of peak that meets the target too (registry.Case)
    budget_ms: Optional[float] = None
    note: str = ""
    error: Optional[str] = None
    torch_missing: Optional[str] = None  # why torch was not run (only ours timed)
    torch_samples_ms: list = field(default_factory=list)
    ours_samples_ms: list = field(default_factory=list)

    @property
    def speedup(self) -> Optional[float]:
        if self.torch_ms and self.ours_ms:
            return self.torch_ms / self.ours_ms
        return None

    @property
    def pct_needed(self) -> Optional[float]:
        """The share of the measured peak (%) our rate would need for the speedup target at torch's rate
        of this run: over 100, no kernel on this machine can meet the target against this torch."""
        if self.target is None or self.speedup is None or self.pct_peak is None:
            return None
        return self.pct_peak * self.target / self.speedup

    @property
    def speedup_met(self) -> Optional[bool]:
        """Whether the case met its speedup target, or the share of peak that meets it too (None: no target
        or no speedup)."""
        if self.target is None or self.speedup is None:
            return None
        by_peak = self.peak_target is not None and self.pct_peak is not None and self.pct_peak >= self.peak_target
        return self.speedup >= self.target or by_peak

    @property
    def target_met(self) -> Optional[bool]:
        """Whether the case met the speedup target and the time budget it has (None: it has neither)."""
        checks = []
        if self.speedup_met is not None:
            checks.append(self.speedup_met)
        if self.budget_ms is not None and self.ours_ms is not None:
            checks.append(self.ours_ms <= self.budget_ms)
        return all(checks) if checks else None


def _ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v < 0.01:
        return f"{v * 1e3:.2f} us"
    return f"{v:.3f}" if v < 100 else f"{v:.1f}"


def format_tables(results: list[Result]) -> str:
    families: dict[str, list[Result]] = {}
    for r in results:
        families.setdefault(r.family, []).append(r)
    out = []
    header = ["case", "torch ms", "pyseqkern ms", "speedup", "GFLOP/s or GB/s", "% of peak", "note"]
    for family, rows in families.items():
        table = [header]
        for r in rows:
            if r.error:
                table.append([f"{r.device}: {r.name}", "-", "-", "-", "-", "-", f"ERROR: {r.error}"])
                continue
            speed = f"{r.speedup:.2f}x" if r.speedup else "-"
            if r.target is not None and r.speedup is not None:
                also = f" or {r.peak_target:g}% of peak" if r.peak_target is not None else ""
                speed += f" ({'ok' if r.target_met else 'MISS'} >= {r.target:g}x{also})"
            rate = f"{r.rate:,.1f} {r.unit}" if r.rate is not None else "-"
            if r.rate is not None and r.torch_rate is not None:
                rate += f" (torch {r.torch_rate:,.1f})"
            pct = f"{r.pct_peak:.0f}%" if r.pct_peak is not None else "-"
            note = r.note
            if r.torch_missing:
                note = f"torch not run: {r.torch_missing}" + (f"; {note}" if note else "")
            if r.speedup_met is False and r.pct_needed is not None:
                note = f"{r.target:g}x needs {r.pct_needed:.0f}% of peak" + (f"; {note}" if note else "")
            if r.budget_ms is not None:
                ok = r.ours_ms is not None and r.ours_ms <= r.budget_ms
                note = f"{'ok' if ok else 'MISS'}: budget {_ms(r.budget_ms)} per call" + (f"; {note}" if note else "")
            table.append([f"{r.device}: {r.name}", _ms(r.torch_ms), _ms(r.ours_ms), speed, rate, pct, note])
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines = [f"== {family} =="]
        for k, row in enumerate(table):
            lines.append(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
            if k == 0:
                lines.append("-+-".join("-" * w for w in widths))
        out.append("\n".join(lines))
    return "\n\n".join(out)


def write_json(path: str, results: list[Result], ceilings: dict, meta: dict) -> None:
    doc = {
        "meta": {**meta, "platform": platform.platform(), "python": platform.python_version()},
        "ceilings": [{"device": d, "kind": k, "value": v} for (d, k), v in ceilings.items()],
        "results": [{**asdict(r), "speedup": r.speedup, "target_met": r.target_met, "pct_needed": r.pct_needed}
                    for r in results],
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
