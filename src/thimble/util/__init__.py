"""Small torch-free helpers every room uses: files written whole, this CPU, worker threads, CSV tables, sizes
in the unit that fits, a stage's peak RSS, where the workflow's files are."""
