"""The first schema: labellers, sessions, pairs, judgments.

Revision ID: 0001
Revises:
"""
from alembic import op
import sqlalchemy as sa

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "labellers",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(100), nullable=False, unique=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("created_at", TIME, nullable=False),
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("cookie_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("labeller_id", sa.Integer, sa.ForeignKey("labellers.id", ondelete="CASCADE"), nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("expires_at", TIME, nullable=False, index=True),
    )
    op.create_table(
        "pairs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("prompt", sa.JSON, nullable=False),
        sa.Column("first", sa.Text, nullable=False),
        sa.Column("second", sa.Text, nullable=False),
        sa.Column("policy_version", sa.BigInteger, nullable=False, index=True),
        sa.Column("sampling", sa.JSON, nullable=False),
        sa.Column("first_finish", sa.String(16), nullable=False),
        sa.Column("second_finish", sa.String(16), nullable=False),
        sa.Column("rm_score_first", sa.Float, nullable=True),
        sa.Column("rm_score_second", sa.Float, nullable=True),
        sa.Column("rm_version", sa.String(200), nullable=True),
        sa.Column("created_at", TIME, nullable=False, index=True),
    )
    op.create_table(
        "judgments",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("pair_id", sa.Integer, sa.ForeignKey("pairs.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("labeller_id", sa.Integer, sa.ForeignKey("labellers.id", ondelete="CASCADE"), nullable=False),
        sa.Column("choice", sa.String(8), nullable=True),
        sa.Column("shown_at", TIME, nullable=False),
        sa.Column("judged_at", TIME, nullable=True, index=True),
        sa.UniqueConstraint("pair_id", "labeller_id", name="uq_judgments_pair_labeller"),
        sa.CheckConstraint("choice IN ('first', 'second', 'tie', 'skip')", name="ck_judgments_choice"),
    )
    op.create_index("ix_judgments_labeller_judged", "judgments", ["labeller_id", "judged_at"])


def downgrade() -> None:
    op.drop_table("judgments")
    op.drop_table("pairs")
    op.drop_table("sessions")
    op.drop_table("labellers")
