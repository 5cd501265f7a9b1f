"""Config of `recllm build-reviews` (section ``reviews:``): the review domains (Amazon categories), how many
past reviews each user and item brings (k), and which users are held out for validation and test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data_pipeline.config_schema import positive


@dataclass
class ReviewsConfig:
    domains: dict[str, str] = field(default_factory=lambda: {
        "digital_music": "data/reviews/digital_music",
        "musical_instruments": "data/reviews/musical_instruments"})
    """Domain name -> folder of Amazon review dumps (CSV or JSON lines); one domain per product category."""
    k: int = 5
    """Past reviews kept per user and per item (the most recent train reviews, never the target review)."""
    min_user_reviews: int = 3
    """Users with at least this many reviews give their last review to test and the one before to valid;
    users with fewer keep all their reviews in train."""
    max_review_chars: int = 1000
    """Review texts are cut to this many characters when written (Digital Music reviews run long)."""

    def check(self) -> list[str]:
        problems = positive("k", self.k) + positive("max_review_chars", self.max_review_chars)
        if self.min_user_reviews < 3:
            problems.append(f"min_user_reviews: {self.min_user_reviews}; expected >= 3 (one train, one valid, "
                            f"one test review)")
        if not self.domains:
            problems.append("domains: empty; give at least one name: folder")
        for name, path in self.domains.items():
            if not name or not name.replace("_", "").isalnum():
                problems.append(f"domains: name {name!r}; expected letters, digits and _ (it names a folder)")
            if not path:
                problems.append(f"domains.{name}: empty path")
        return problems
