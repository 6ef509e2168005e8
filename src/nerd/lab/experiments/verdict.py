"""Verdicts: the paper's ordering of variants next to ours, judged pair by pair against a resolution.

A claim is a set of expected relations "a beats b" between variants (from the paper's numbers, from an ordering
the paper states, or "a is not worse than b"). Each relation is judged on our measurement:

* a strict relation ``a > b`` (paper gap g) is *below resolution* when |g| < resolution: even a perfect reproduction
  could not resolve it at our scale, so it is left out. Otherwise our difference d = ours[a] - ours[b] (signed so
  that positive means "a is better") *confirms* it when d >= resolution, *contradicts* it when d <= -resolution,
  and is *inconclusive* in between;
* a relation ``a >= b`` ("not worse") is confirmed when d > -resolution and contradicted otherwise.

The claim is "reproduced" when every judged relation is confirmed, "not reproduced" when any is contradicted, and
"not measurable at this scale" when nothing was judged, when some relation is inconclusive, or when the scale says
so up front (the smoke preset: a handful of steps measures nothing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
NOT_MEASURABLE = "not measurable at this scale"
STATUSES = (REPRODUCED, NOT_REPRODUCED, NOT_MEASURABLE)

Relation = Literal[">", ">="]


@dataclass(frozen=True)
class Expect:
    """The paper expects variant `a` to beat (">") or not to lose to (">=") variant `b`; `gap` is its difference."""

    a: str
    b: str
    relation: Relation = ">"
    gap: float | None = None


@dataclass
class Verdict:
    """One claim judged. `pairs` holds one entry per expected relation: a, b, relation, paper gap, ours, outcome."""

    claim: str
    status: str
    paper_order: str
    our_order: str
    resolution: float | None
    metric: str = "PSNR (dB)"
    pairs: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""
    primary: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """'claim: status (paper: a > b; ours: a > b)'."""
        text = f"{self.claim}: **{self.status}** (paper: {self.paper_order}; ours: {self.our_order})"
        return text + (f" — {self.note}" if self.note else "")


def from_numbers(paper: Mapping[str, float], *, higher_is_better: bool = True) -> list[Expect]:
    """Every pair of variants, ordered as the paper's numbers order them (equal numbers give no relation)."""
    sign = 1.0 if higher_is_better else -1.0
    names = list(paper)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            gap = round(sign * (paper[a] - paper[b]), 9)  # 30.84 - 30.78 is 0.06, not 0.0599999
            if gap > 0:
                out.append(Expect(a, b, ">", gap))
            elif gap < 0:
                out.append(Expect(b, a, ">", -gap))
    return out


def from_order(order: Sequence[str], relation: Relation = ">") -> list[Expect]:
    """Every pair of an ordering stated best first (no gap known: always judged)."""
    return [Expect(a, b, relation) for i, a in enumerate(order) for b in order[i + 1 :]]


def ordering(values: Mapping[str, float], *, higher_is_better: bool = True, resolution: float | None = None,
             fmt: str = "{:.2f}") -> str:
    """'a > b ≈ c' from best to worst ('a < b' when lower is better); neighbours closer than `resolution` are
    joined with '≈'."""
    items = sorted(values.items(), key=lambda kv: kv[1], reverse=higher_is_better)
    if not items:
        return "-"
    text = items[0][0]
    for (_, prev), (name, val) in zip(items, items[1:], strict=False):
        close = resolution is not None and abs(prev - val) < resolution
        text += f" {'≈' if close else '>' if higher_is_better else '<'} {name}"
    return text


def judge(
    claim: str,
    expected: Sequence[Expect],
    ours: Mapping[str, float],
    *,
    resolution: float | None,
    higher_is_better: bool = True,
    paper_values: Mapping[str, float] | None = None,
    paper_order: str | None = None,
    metric: str = "PSNR (dB)",
    primary: bool = True,
    note: str = "",
) -> Verdict:
    """Judge `expected` relations on our values (see the module docstring). `resolution` None: not measurable."""
    sign = 1.0 if higher_is_better else -1.0
    pairs: list[dict[str, Any]] = []
    for e in expected:
        if e.a not in ours or e.b not in ours:
            outcome = "missing"
            d = None
        else:
            d = round(sign * (ours[e.a] - ours[e.b]), 9)
            if resolution is None:
                outcome = "not judged"
            elif e.relation == ">" and e.gap is not None and abs(e.gap) < resolution:
                outcome = "below resolution"
            elif e.relation == ">=":
                outcome = "confirmed" if d > -resolution else "contradicted"
            else:
                outcome = "confirmed" if d >= resolution else "contradicted" if d <= -resolution else "inconclusive"
        pairs.append({"a": e.a, "b": e.b, "relation": e.relation, "paper_gap": e.gap,
                      "ours": None if d is None else round(d, 6), "outcome": outcome})
    outcomes = [p["outcome"] for p in pairs]
    judged = [o for o in outcomes if o in ("confirmed", "contradicted", "inconclusive")]
    if resolution is None or not judged or "missing" in outcomes:
        status = NOT_MEASURABLE
    elif "contradicted" in judged:
        status = NOT_REPRODUCED
    elif "inconclusive" in judged:
        status = NOT_MEASURABLE
    else:
        status = REPRODUCED
    if not note:
        if resolution is None:
            note = "smoke scale: checks the pipeline, measures nothing"
        elif not judged:
            note = f"every difference the paper reports is below our resolution ({resolution:g})"
        elif "inconclusive" in judged and status == NOT_MEASURABLE:
            tied = [f"{p['a']} vs {p['b']}" for p in pairs if p["outcome"] == "inconclusive"]
            note = f"our differences within ±{resolution:g}: {', '.join(tied)}"
    if paper_order is None:
        paper_order = (ordering(paper_values, higher_is_better=higher_is_better) if paper_values
                       else (" > " if higher_is_better else " < ").join(_order_from_pairs(expected)))
    our = ordering({k: v for k, v in ours.items() if k in _names(expected) or not expected},
                   higher_is_better=higher_is_better, resolution=resolution)
    return Verdict(claim, status, paper_order, our, resolution, metric, pairs, note, primary)


def _names(expected: Sequence[Expect]) -> list[str]:
    seen: list[str] = []
    for e in expected:
        for n in (e.a, e.b):
            if n not in seen:
                seen.append(n)
    return seen


def _order_from_pairs(expected: Sequence[Expect]) -> list[str]:
    """Names sorted by how many others they are expected to beat (an ordering for display)."""
    wins = {n: 0 for n in _names(expected)}
    for e in expected:
        wins[e.a] += 1
    return sorted(wins, key=lambda n: -wins[n])


def overall(verdicts: Sequence[Verdict]) -> str:
    """The experiment's verdict from its primary claims: all reproduced, any not reproduced, else not measurable."""
    statuses = [v.status for v in verdicts if v.primary] or [v.status for v in verdicts]
    if not statuses:
        return NOT_MEASURABLE
    if NOT_REPRODUCED in statuses:
        return NOT_REPRODUCED
    if all(s == REPRODUCED for s in statuses):
        return REPRODUCED
    return NOT_MEASURABLE
