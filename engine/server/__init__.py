"""HTTP only: the FastAPI app, its form parsing, headers and browser routes."""
