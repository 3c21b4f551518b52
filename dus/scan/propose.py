"""From measured distances to proposals, and proposals to ready recipes.

Every cut studied here puts one layer after a layer it never followed, and the input
that layer gets differs from the one it was trained on by d(h_start, h_end) for a block
[start, end):
- SOLAR with trim m repeats layers [m, L-m): output layer L-m is source layer m and
  receives h_{L-m} instead of h_m. (SOLAR *is* the centred case of duplication.)
- duplicating [s, s+n) in place: source layer s receives h_{s+n} instead of h_s.
- pruning [s, s+n) (Gromov et al. 2024): source layer s+n receives h_s instead of h_{s+n}.
So the block with the smallest d(h_s, h_{s+n}) is the most redundant one: repeating it
repeats a near-identity function and removing it loses one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from dus.errors import DusError
from dus.scan.measure import ScanMeasurement


@dataclass(frozen=True)
class Candidate:
    kind: str  # "solar", "duplicate" or "prune"
    start: int  # the block [start, end) of source layers repeated, or removed
    end: int
    distance: float  # d(h_start, h_end): the input mismatch at the seam
    output_layers: int

    @property
    def name(self) -> str:
        if self.kind == "solar":
            return f"solar-trim{self.start}"
        return f"{self.kind}-{self.start}-{self.end}"

    @property
    def description(self) -> str:
        what = {
            "solar": f"SOLAR trim {self.start}: repeats layers [{self.start}, {self.end})",
            "duplicate": f"duplicate layers [{self.start}, {self.end}) once in place",
            "prune": f"remove layers [{self.start}, {self.end})",
        }[self.kind]
        return f"{what}; {self.output_layers} layers; seam input mismatch d(h_{self.start}, h_{self.end}) = {self.distance:.4f}"

    def recipe(self, model: str, num_layers: int) -> dict:
        """The recipe `dus build` takes (presets solar / duplicate, mergekit slices for pruning)."""
        if self.kind == "solar":
            return {"solar": {"model": model, "trim": self.start}}
        if self.kind == "duplicate":
            return {"duplicate": {"model": model, "layers": [self.start, self.end]}}
        ranges = [(0, self.start), (self.end, num_layers)]
        slices = [{"sources": [{"model": model, "layer_range": [a, b]}]} for a, b in ranges if b > a]
        return {"merge_method": "passthrough", "slices": slices}

    def to_dict(self) -> dict:
        return {**asdict(self), "name": self.name}


@dataclass
class Proposal:
    num_layers: int
    trim: int
    solar: Candidate
    solar_by_trim: list[Candidate]  # every trim 1 .. (L-1)//2, for the trade-off depth vs mismatch
    duplicate_size: int
    duplicates: list[Candidate]  # every range of that size, least harmful first
    prune_size: int
    prunes: list[Candidate]
    layer_ranking: list[int]  # layers by d(h_l, h_{l+1}), most redundant first
    influence_ranking: list[int]  # layers by block influence, lowest first

    def to_dict(self) -> dict:
        data = asdict(self)
        data["solar"] = self.solar.to_dict()
        for key in ("solar_by_trim", "duplicates", "prunes"):
            data[key] = [candidate.to_dict() for candidate in getattr(self, key)]
        return data


def block_sizes(depth: int, trim: int | None, duplicate: int | None, prune: int | None, model: str = "the model") -> tuple[int, int, int]:
    """(trim, duplicate, prune) with their defaults, or a DusError before any work is done."""
    if depth < 3:
        raise DusError(f"{model} has {depth} layers; a scan needs at least 3")
    trim = max(1, depth // 4) if trim is None else trim
    if not 1 <= trim <= (depth - 1) // 2:
        raise DusError(f"--trim {trim} does not fit a {depth}-layer model; use 1 <= trim <= {(depth - 1) // 2} so that SOLAR repeats at least one layer")
    duplicate = depth - 2 * trim if duplicate is None else duplicate
    prune = trim if prune is None else prune
    for option, size in (("--duplicate", duplicate), ("--prune", prune)):
        if not 1 <= size <= depth - 1:
            raise DusError(f"{option} {size} does not fit a {depth}-layer model; use 1 .. {depth - 1} layers")
    return trim, duplicate, prune


def propose(measurement: ScanMeasurement, trim: int | None = None, duplicate: int | None = None, prune: int | None = None) -> Proposal:
    """`trim` defaults to L/4 (SOLAR's 8 of 32); the duplicated block defaults to the
    L - 2m layers SOLAR repeats (same output depth), the pruned one to m layers."""
    depth = measurement.num_layers
    trim, duplicate, prune = block_sizes(depth, trim, duplicate, prune, measurement.model)

    def solar(m: int) -> Candidate:
        return Candidate("solar", m, depth - m, measurement.distance(m, depth - m), 2 * (depth - m))

    def blocks(kind: str, size: int, output_layers: int) -> list[Candidate]:
        found = [Candidate(kind, s, s + size, measurement.distance(s, s + size), output_layers) for s in range(depth - size + 1)]
        return sorted(found, key=lambda c: (c.distance, c.start))

    consecutive = measurement.distances[1]
    return Proposal(
        num_layers=depth,
        trim=trim,
        solar=solar(trim),
        solar_by_trim=[solar(m) for m in range(1, (depth - 1) // 2 + 1)],
        duplicate_size=duplicate,
        duplicates=blocks("duplicate", duplicate, depth + duplicate),
        prune_size=prune,
        prunes=blocks("prune", prune, depth - prune),
        layer_ranking=sorted(range(depth), key=lambda l: (consecutive[l], l)),
        influence_ranking=sorted(range(depth), key=lambda l: (measurement.block_influence[l], l)),
    )


def rank_pool(proposal: Proposal, count: int) -> list[Candidate]:
    """The `count` least-harmful duplication ranges, plus SOLAR's own cut as the reference
    when it is not among them (it is the same recipe as duplicating [m, L-m))."""
    pool = list(proposal.duplicates[:count])
    solar = proposal.solar
    same_as_solar = lambda c: (c.start, c.end) == (solar.start, solar.end)  # noqa: E731
    if proposal.duplicate_size == solar.end - solar.start and not any(same_as_solar(c) for c in pool):
        pool.append(solar)
    return [solar if same_as_solar(c) else c for c in pool]


def write_recipes(proposal: Proposal, model: str | Path, directory: str | Path, data_name: str,
                  force: bool = False) -> list[Path]:
    """SOLAR with the chosen trim, the best duplication range and the best pruning block,
    each a YAML file `dus build` takes as it is. An existing file is replaced only with
    `force`, and only when dus scan wrote it (see dus.report_output)."""
    from dus.report_output import PROPOSAL_HEADER, is_proposal

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = str(Path(model).resolve())
    chosen = [proposal.solar]
    best_duplicate = proposal.duplicates[0]
    if (best_duplicate.start, best_duplicate.end) != (proposal.solar.start, proposal.solar.end):
        chosen.append(best_duplicate)
    chosen.append(proposal.prunes[0])
    written = []
    for candidate in chosen:
        path = directory / f"{candidate.name}.yaml"
        if (path.exists() or path.is_symlink()) and not (force and is_proposal(path)):
            raise DusError(f"{path}: already exists; add --force to replace an earlier dus scan proposal, or choose "
                           "another --write-recipes directory")
        header = f"{PROPOSAL_HEADER} on {data_name}: {candidate.description}.\n"
        body = {"name": candidate.name, "description": candidate.description, **candidate.recipe(model, proposal.num_layers)}
        path.write_text(header + yaml.safe_dump(body, sort_keys=False))
        written.append(path)
    return written
