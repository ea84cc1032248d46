"""`shelf serve`: real-time re-ranking over HTTP from the published run, without Spark (docs/SERVING.md)."""
