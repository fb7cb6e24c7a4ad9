"""Where every scoring event went (DESIGN.md section 2): nothing may vanish.

    scoring events = kept pairs + rejected by the threshold + dropped as non-finite
    kept pairs     = trained + dropped for rank balance (+ in flight at a crash, redone after)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Accounting:
    prompts: int = 0  # trajectories sampled
    scoring_events: int = 0  # (prompt, segment) pools scored
    kept: int = 0  # pairs that passed the threshold
    rejected: int = 0  # pools whose pair failed the threshold
    dropped_nonfinite: int = 0  # pools with a non-finite score (or latent): never a pair
    trained: int = 0  # kept pairs whose transitions reached an optimizer step
    dropped_rank_balance: int = 0  # kept pairs cut by streaming_split(equal=True)
    transitions_trained: int = 0  # loss terms (a segment pair with m transitions gives m)
    optimizer_steps: int = 0
    skipped_steps: int = 0  # non-finite loss or gradient

    def add(self, **counts: int) -> None:
        for key, value in counts.items():
            setattr(self, key, getattr(self, key) + value)

    def problems(self) -> list[str]:
        """Identities that do not hold; empty when every bucket adds up."""
        out = []
        if self.scoring_events != self.kept + self.rejected + self.dropped_nonfinite:
            out.append(f"scoring events {self.scoring_events} != kept {self.kept} + rejected {self.rejected} + "
                       f"non-finite {self.dropped_nonfinite}")
        if self.kept != self.trained + self.dropped_rank_balance:
            out.append(
                f"kept {self.kept} != trained {self.trained} + dropped for rank balance {self.dropped_rank_balance}"
            )
        return out

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"prompts {self.prompts} | scoring events {self.scoring_events} = kept {self.kept} + rejected "
            f"{self.rejected} + non-finite {self.dropped_nonfinite} | kept {self.kept} = trained {self.trained} + dropped for rank balance "
            f"{self.dropped_rank_balance} | transitions {self.transitions_trained} | optimizer steps "
            f"{self.optimizer_steps} (skipped {self.skipped_steps})"
        )
