"""Teacher flow-stream networks and their precomputed targets."""
