"""The leaderboard (records ranked per suite) and submission bundles (records from outside, checked)."""
