"""Pure computation, one module per stage; nothing here imports luigi."""
