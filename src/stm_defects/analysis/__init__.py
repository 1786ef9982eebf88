"""Per-scan analysis above both methods: dispatch by method, predict, pictures, scores."""
