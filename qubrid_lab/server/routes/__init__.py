"""HTTP routes, one module per resource; handlers are named after the specs' operationIds."""
