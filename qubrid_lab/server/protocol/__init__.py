"""Wire models of the platform API, one module per resource, fields in the order of the reference spec."""
