"""spo-ray: Step-by-step Preference Optimization (SPO) for diffusion models, on Ray."""

__version__ = "0.1.0"
