"""Review data for rating prediction and the review tasks: per-domain split and k-review histories."""
