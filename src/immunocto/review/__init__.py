"""The review app: reviewers, decisions in SQLite, batch strategies, agreement statistics,
the FastAPI server and its page, and the export of ``review_label`` (version V0)."""

from immunocto.review.store import DECISION_LABELS, ReviewStore, review_path

__all__ = ["DECISION_LABELS", "ReviewStore", "review_path"]
