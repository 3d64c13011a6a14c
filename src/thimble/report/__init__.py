"""What a person reads: each experiment's figures and summary page, and a series' figures and tables."""
