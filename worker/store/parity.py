"""The parity gate's evidence: per model (its weights' digest) and kind of bf16 hardware, how
many rows scoring jobs scored in both fp32 and bf16 and how many of them got the same answer.

Jobs add to it as they sample; adding is one atomic update, so jobs gating the same model at
the same moment both count.
"""

from __future__ import annotations

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from tuneq.schemas.tables import ParityCheck, utcnow


def parity_evidence(engine: Engine, *, model_digest: str, hardware: str) -> tuple[int, int]:
    """``(agreed, sampled)`` for the model on this hardware so far; ``(0, 0)`` before any."""
    with engine.connect() as conn:
        row = conn.execute(
            select(ParityCheck.agreed, ParityCheck.sampled).where(
                ParityCheck.model_digest == model_digest, ParityCheck.hardware == hardware
            )
        ).first()
    return (int(row.agreed), int(row.sampled)) if row else (0, 0)


def add_parity_evidence(
    engine: Engine, *, model_digest: str, hardware: str, agreed: int, sampled: int
) -> tuple[int, int]:
    """Add one job's sample to the model's evidence on this hardware; returns the new total."""
    key = (ParityCheck.model_digest == model_digest, ParityCheck.hardware == hardware)
    for _ in range(3):
        with engine.begin() as conn:
            added = conn.execute(
                update(ParityCheck)
                .where(*key)
                .values(
                    agreed=ParityCheck.agreed + agreed,
                    sampled=ParityCheck.sampled + sampled,
                    updated_at=utcnow(),
                )
            )
            if added.rowcount:
                break
        try:
            with engine.begin() as conn:
                conn.execute(
                    insert(ParityCheck).values(
                        model_digest=model_digest,
                        hardware=hardware,
                        agreed=agreed,
                        sampled=sampled,
                        updated_at=utcnow(),
                    )
                )
            break
        except IntegrityError:
            continue  # another job inserted the first row meanwhile: add to it
    return parity_evidence(engine, model_digest=model_digest, hardware=hardware)
