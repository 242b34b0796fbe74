"""Sample evaluation (FID, sFID, Inception Score, precision, recall) as the ADM evaluator computes it."""
