"""Moving models of ours to other serving stacks (``qubrid-lab export``)."""
