"""Pure loss functions: each returns `(loss, metrics)` with its reduction stated."""
