"""message stage."""
